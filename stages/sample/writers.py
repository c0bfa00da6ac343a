"""Output writers: one mp4 per video and a streamed `videos.npz` for evaluation (the GIF grid is
stages.common.sampling.write_gif_grid, shared with the trainer's periodic samples)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from stages.common.synth import write_mp4


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad H and W to even sizes by edge replication (H.264 yuv420p needs even sizes)."""
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """One uint8 RGB video [T, H, W, 3] as H.264 mp4."""
    write_mp4(path, _even(np.ascontiguousarray(frames)), fps=fps)


class NpzVideoWriter:
    """Write `videos` (uint8 [N, T, H, W, 3]) and `labels` into an .npz batch by batch.

    An .npz is a zip of .npy files, so the video array is streamed into the archive instead of
    being held in memory whole (2048 videos of 16x256x256 are 6 GB). It is written under a
    temporary name and renamed once complete, so a killed sampler never leaves a torn file
    under the final name.
    """

    def __init__(self, path: Path, num: int, labels: np.ndarray):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.num = num
        self.written = 0
        self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        with self._zip.open("labels.npy", "w") as fh:
            np.lib.format.write_array(fh, np.asarray(labels, dtype=np.int64))
        self._fh = None
        self._shape: tuple[int, ...] | None = None

    def write(self, batch: np.ndarray) -> None:
        if batch.dtype != np.uint8 or batch.ndim != 5:
            raise ValueError(f"expected uint8 [B, T, H, W, 3], got {batch.dtype} {batch.shape}")
        if self._fh is None:
            self._shape = batch.shape[1:]
            self._fh = self._zip.open("videos.npy", "w", force_zip64=True)
            header = {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                "fortran_order": False,
                "shape": (self.num, *self._shape),
            }
            np.lib.format.write_array_header_2_0(self._fh, header)
        if batch.shape[1:] != self._shape:
            raise ValueError(f"video shape changed from {self._shape} to {batch.shape[1:]}")
        if self.written + len(batch) > self.num:
            raise ValueError(f"more than the announced {self.num} videos")
        self._fh.write(np.ascontiguousarray(batch).tobytes())
        self.written += len(batch)

    def close(self) -> None:
        """Finish the archive and give it its final name; an incomplete one is removed."""
        if self._fh is not None:
            self._fh.close()
        self._zip.close()
        if self.written != self.num:
            self.tmp.unlink(missing_ok=True)
            raise RuntimeError(
                f"{self.path}: wrote {self.written} of {self.num} videos; incomplete, so the file was not written"
            )
        os.replace(self.tmp, self.path)


def partial_path(path: Path) -> Path:
    """Where a file is written before it is complete (cache_schema.outputs lists the pattern)."""
    return path.with_name(path.name + ".partial")


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez under a temporary name, then renamed: never a torn file under `path`."""
    tmp = partial_path(path)
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
