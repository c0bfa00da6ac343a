"""What bench/cache.py and bench/train_step.py share: the samples/s a loader alone delivers."""

from __future__ import annotations

import time

from stages.common.runtime import close_loader
from stages.train.data import LoaderSpec, build_loader


def samples_per_s(spec: LoaderSpec, batches: int) -> float:
    """Samples/s of `build_loader(spec)` (read, crc32, decode, collate; no model), after its workers
    started."""
    it = iter(build_loader(spec, 0))
    try:
        for _ in range(max(2, 2 * spec.num_workers)):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - start
    finally:
        close_loader(it)
    return batches * spec.batch_size / seconds
