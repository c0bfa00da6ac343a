"""Shards -> batches: a deterministic, resumable WebDataset stream.

Why segments: a resampled WebDataset stream has no cheap "seek". We cut training into
segments of `segment_steps` optimizer steps; the stream of segment k is a pure function of
(seed, k, rank, worker). Resuming at step s rebuilds segment s // segment_steps and skips the
batches already consumed inside it (at most one segment's worth), so N steps + resume + N
steps sees exactly the batches of 2N straight steps.

Within a segment all ranks and workers draw from one shared resampled shard sequence and
take disjoint slices of it (`split_by_node`, then `split_by_worker`), then shuffle samples
through a buffer seeded per (segment, rank, worker).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any printable parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def shard_urls(shards: str, index: dict[str, Any]) -> list[str]:
    """Full paths/URLs of the shards listed in index.json."""
    names = [s["name"] for s in index["shards"] if int(s.get("samples", 1)) > 0]
    if not names:
        raise ValueError(f"{shards}: index.json lists no non-empty shards")
    return [f"{str(shards).rstrip('/')}/{name}" for name in names]


@dataclass
class LoaderSpec:
    """What the stream depends on; `segment_steps` x `batches_per_step` batches per segment."""

    urls: list[str]
    seed: int
    batch_size: int
    batches_per_step: int  # gradient accumulation micro-batches per optimizer step
    segment_steps: int
    shuffle_buffer: int = 1000
    num_workers: int = 0
    pin_memory: bool = False


def _constant_worker_seed() -> int:
    # Every rank and worker generates the same shard sequence; the splitters make them disjoint.
    return 0


class SeededShuffle:
    """A shuffle-buffer stage whose RNG depends on (seed, segment, rank, worker) only.

    A class rather than a closure so DataLoader workers can pickle it under `spawn`.
    """

    def __init__(self, seed: int, segment: int, bufsize: int):
        self.seed, self.segment, self.bufsize = seed, segment, max(1, bufsize)

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(derive_seed("shuffle", self.seed, self.segment, rank, worker))
        buf: list[dict] = []
        for sample in src:
            buf.append(sample)
            if len(buf) >= self.bufsize:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_sample(sample: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One shard sample -> {latent [C,T',h,w] fp32, target [T,H,W,D] fp16, label long (-1 = none)}."""
    try:
        latent = _npy(sample["latent.npy"])
        target = _npy(sample["target.npy"])
    except KeyError as exc:
        raise ValueError(
            f"shard sample {sample.get('__key__')} has no {exc.args[0]} (not a schema-v1 shard)"
        ) from None
    cls = sample.get("cls")
    label = -1 if cls is None else int(cls.decode() if isinstance(cls, bytes) else cls)
    return {
        "latent": torch.from_numpy(latent.astype(np.float32)),
        "target": torch.from_numpy(np.ascontiguousarray(target)),
        "label": torch.tensor(label, dtype=torch.long),
    }


def build_dataset(spec: LoaderSpec, segment: int) -> wds.DataPipeline:
    """The infinite sample stream of one segment."""
    return wds.DataPipeline(
        wds.ResampledShards(
            spec.urls,
            seed=derive_seed("shards", spec.seed, segment),
            worker_seed=_constant_worker_seed,
            deterministic=True,
        ),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        SeededShuffle(spec.seed, segment, spec.shuffle_buffer),
        wds.map(decode_sample),
    )


def _worker_init(worker_id: int) -> None:
    # Schedulers (Slurm, k8s) signal every process of a job; the main process handles SIGTERM
    # by finishing the step and checkpointing, which needs its loader workers alive meanwhile.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(spec: LoaderSpec, segment: int) -> DataLoader:
    """A DataLoader over one segment's stream; batches come from the workers in a fixed order."""
    return DataLoader(
        build_dataset(spec, segment),
        batch_size=spec.batch_size,
        num_workers=spec.num_workers,
        pin_memory=spec.pin_memory,
        # A private generator keeps the loader from consuming the global torch RNG.
        generator=torch.Generator().manual_seed(derive_seed("loader", spec.seed, segment)),
        worker_init_fn=_worker_init if spec.num_workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=4 if spec.num_workers > 0 else None,
    )


def iterate_steps(spec: LoaderSpec, start_step: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Yield, for step = start_step, start_step + 1, ..., the micro-batches of that optimizer step."""
    step = start_step
    while True:
        segment = step // spec.segment_steps
        batches = iter(build_loader(spec, segment))
        for _ in range((step - segment * spec.segment_steps) * spec.batches_per_step):
            next(batches)  # replay the part of the segment consumed before a resume
        while step < (segment + 1) * spec.segment_steps:
            yield [next(batches) for _ in range(spec.batches_per_step)]
            step += 1
        del batches  # shuts the segment's workers down
