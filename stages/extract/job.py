"""What one extraction knows once its models are loaded and its clips planned, and the one way
clips reach the models (decoding workers that never outlive the run)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cache_schema.layout import TextEntry
from cache_schema.text import to_stored
from stages.common import runtime
from stages.common import video as V

from .config import ExtractConfig
from .models import ExtractError, Features, Models, TargetPlan, nonfinite_rows
from .writer import keep_items


@dataclass
class Job:
    """The resolved request: config, clips, models, grids and per-encoder target plans."""

    cfg: ExtractConfig
    dist: runtime.DistInfo
    source: V.VideoSource
    clip_spec: V.ClipSpec
    refs: list[V.ClipRef]
    skipped: list[V.Skipped]
    lengths: list[int]  # frames per video entry (0: unreadable), for re-planning in the budget
    models: Models
    latent_shape: tuple[int, int, int, int]
    grid: tuple[int, int, int]
    plans: list[TargetPlan]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def num_clips(self) -> int:
        return len(self.refs)

    def video_path(self, row: int) -> str:
        return self.source.entries[self.refs[row].video_index].path

    def caption(self, row: int) -> str:
        return self.source.entries[self.refs[row].video_index].caption or ""

    @property
    def text(self) -> TextEntry | None:
        """The layout's text entry when the clips' captions are embedded (--base), else None."""
        enc = self.models.text
        return None if enc is None else TextEntry(str(self.cfg.base), enc.max_length, enc.dim)

    def encode_text(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The stored prompt embeddings (float16 [n, L, D]) and masks (uint8 [n, L]) of store rows."""
        assert self.models.text is not None
        t0 = time.perf_counter()
        embeds, mask = self.models.text.encode([self.caption(r) for r in rows])
        self.timings["text"] = self.timings.get("text", 0.0) + time.perf_counter() - t0
        where = f"prompt embeddings of {self.video_path(rows[0])}" if rows else "prompt embeddings"
        return to_stored(embeds.numpy(), where), mask.numpy()


@contextlib.contextmanager
def decoding(job: Job, batches: list[list[int]]) -> Iterator[Iterator[list[dict[str, Any]]]]:
    """Batches of decoded clip items (store rows), decoded ahead in worker processes.

    Workers die with this process (PR_SET_PDEATHSIG, also on kill -9) and are killed at once
    when the run ends or fails (`runtime.close_loader`), so nothing is left decoding."""
    workers = job.cfg.num_workers
    loader = DataLoader(
        V.ClipDataset(job.source, job.refs, job.clip_spec),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=keep_items,
        pin_memory=job.device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=runtime.worker_init if workers > 0 else None,
    )
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        runtime.close_loader(iterator)


def to_device(job: Job, items: list[dict[str, Any]]) -> torch.Tensor | None:
    """uint8 frames [B_ok,T,H,W,3] of the decoded items, on the models' device (None: none decoded)."""
    ok = [it["frames"] for it in items if it["frames"] is not None]
    if not ok:
        return None
    return torch.stack([torch.as_tensor(f) for f in ok]).to(job.device, non_blocking=True)


def check_finite(job: Job, features: Features, clips: list[int]) -> None:
    """Stop (writing nothing of the block) on NaN/Inf, naming the clip and its video."""
    bad = nonfinite_rows(features)
    if bad:
        clip = clips[bad[0]]
        raise ExtractError(
            f"non-finite features (NaN/Inf) for clip {clip} of video {job.video_path(clip)}; "
            "the block was not written: check the video and the model weights/dtype"
        )


def sample_rows(n: int, first: int, second: int, seed: int) -> tuple[list[int], list[int]]:
    """Two seeded samples of store rows, disjoint while there are enough rows: `first` rows, then
    `second` rows from the rest, topped up from the first sample only when the rest runs out."""
    perm = np.random.default_rng([seed, 0xF1DE]).permutation(n)
    a = perm[: min(first, n)]
    b = perm[len(a) : len(a) + second]
    want = min(second, n)
    if len(b) < want:
        b = np.concatenate([b, a[: want - len(b)]])
    return sorted(int(i) for i in a), sorted(int(i) for i in b)
