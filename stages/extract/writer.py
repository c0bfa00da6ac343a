"""Feeding and draining the models: block-aligned batches in, whole blocks out to a background
zarr writer (data first, then the block's marker)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np

from cache_schema.layout import EncoderEntry, TextEntry

from .store import mark_block_done, write_block


class BlockSampler:
    """Batches that never cross a block boundary, so a block's result is independent of the others."""

    def __init__(self, blocks: list[tuple[int, int, int]], batch_size: int) -> None:
        self.batches = []
        for _, start, stop in blocks:
            for s in range(start, stop, batch_size):
                self.batches.append(list(range(s, min(s + batch_size, stop))))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def keep_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DataLoader collate that keeps per-clip dicts: failed decodes stay visible per item."""
    return items


class BlockBuffer:
    """One block's compact arrays on the CPU, filled batch by batch; rows of failed clips stay 0."""

    def __init__(
        self,
        block: int,
        start: int,
        stop: int,
        latent_shape,
        grid,
        encoders: list[EncoderEntry],
        meta=None,
        text: TextEntry | None = None,
    ) -> None:
        self.block, self.start, self.stop = block, start, stop
        # the plan's labels, video_index, start_frame, flip of these rows (rewritten with the block)
        self.meta = None if meta is None else {name: rows[start:stop] for name, rows in meta.items()}
        n = stop - start
        self.latents = np.zeros((n, *latent_shape), np.float16)
        self.targets: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        self.norms: dict[str, np.ndarray] = {}
        for enc in encoders:
            values, *rest = (np.zeros((n, *a.shape), a.dtype) for a in enc.arrays(grid))
            self.targets[enc.name] = (values, rest[0] if enc.scales else None)
            if enc.stores_norms:
                self.norms[enc.name] = rest[-1]
        text_arrays = [] if text is None else text.arrays()
        self.text = tuple(np.zeros((n, *a.shape), a.dtype) for a in text_arrays) or None
        self.valid = np.zeros(n, np.uint8)
        self.filled = 0

    def put(
        self,
        clips: list[int],
        latents: np.ndarray,
        targets: dict[str, tuple[Any, Any]],
        norms: dict[str, Any],
        text: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Rows of decoded clips (store indices `clips`); `text`: their prompt embeddings and masks."""
        rows = np.asarray(clips, dtype=np.int64) - self.start
        self.latents[rows] = latents
        for name, (values, scales) in targets.items():
            self.targets[name][0][rows] = values
            if scales is not None:
                self.targets[name][1][rows] = scales
        for name, array in norms.items():
            self.norms[name][rows] = array
        if text is not None and self.text is not None:
            self.text[0][rows], self.text[1][rows] = text
        self.valid[rows] = 1

    def count(self, n: int) -> bool:
        """Account for n clips of this block (decoded or not); True once the block is complete."""
        self.filled += n
        return self.filled == self.stop - self.start


class BlockWriter(threading.Thread):
    """Writes finished blocks in the background so zarr I/O overlaps compute."""

    def __init__(self, group, timings: dict[str, float]) -> None:
        super().__init__(daemon=True)
        self.group, self.timings = group, timings
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            buf = self.jobs.get()
            if buf is None:
                return
            if self.error is not None:
                continue
            try:
                t0 = time.perf_counter()
                write_block(
                    self.group, buf.start, buf.latents, buf.targets, buf.valid, buf.meta, buf.norms, buf.text
                )
                mark_block_done(self.group, buf.block)
                self.timings["write"] = self.timings.get("write", 0.0) + time.perf_counter() - t0
            except BaseException as exc:  # surfaced by the main thread
                self.error = exc

    def submit(self, buf: BlockBuffer) -> None:
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self.jobs.put(buf)  # blocks only when the writer is two blocks behind
        self.timings["write_wait"] = self.timings.get("write_wait", 0.0) + time.perf_counter() - t0

    def close(self) -> None:
        t0 = time.perf_counter()
        self.jobs.put(None)
        self.join()
        self.timings["write_wait"] = self.timings.get("write_wait", 0.0) + time.perf_counter() - t0
        if self.error is not None:
            raise self.error
