"""Feeding and draining the models: block-aligned batches in, background zarr writes out."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

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


class BlockWriter(threading.Thread):
    """Writes finished blocks in the background so zarr I/O overlaps compute."""

    def __init__(self, group, timings: dict[str, float]) -> None:
        super().__init__(daemon=True)
        self.group, self.timings = group, timings
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                continue
            block, start, latents, targets, valid = job
            try:
                t0 = time.perf_counter()
                write_block(self.group, start, latents, targets, valid)
                mark_block_done(self.group, block)
                self.timings["write"] += time.perf_counter() - t0
            except BaseException as exc:  # surfaced by the main thread
                self.error = exc

    def submit(self, *job) -> None:
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self.jobs.put(job)  # blocks only when the writer is two blocks behind
        self.timings["write_wait"] += time.perf_counter() - t0

    def close(self) -> None:
        t0 = time.perf_counter()
        self.jobs.put(None)
        self.join()
        self.timings["write_wait"] += time.perf_counter() - t0
        if self.error is not None:
            raise self.error
