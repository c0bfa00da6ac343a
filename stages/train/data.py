"""Shards -> batches: a deterministic, resumable, checksummed WebDataset stream (schema v2).

Why segments: a resampled WebDataset stream has no cheap "seek". Training is cut into segments
of `segment_steps` optimizer steps; the stream of segment k is a pure function of (seed, k,
rank, worker). Resuming at step s rebuilds segment s // segment_steps and skips the batches
already consumed inside it, so N steps + resume + N steps sees exactly the batches of 2N
straight steps. Once alignment ends (`--align-until`), the stream switches to the
latents-only shard set, which holds the same samples in the same shards and order, so the
switch (and a resume on either side of it) keeps the sample sequence.

Samples stay compact all the way to the device: latents as float16, targets as their stored
format (float16, int8 or packed int4 plus scales); the trainer dequantises on the device. Every
sample's crc32 is checked as it is decoded (the bytes are already in hand): a corrupt sample
stops the run naming its shard and key, or with `on_corrupt="skip"` is dropped and reported.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from cache_schema import constants as C
from cache_schema.checksum import verify_checksum
from stages.common.runtime import close_loader, worker_init

# Decoded-byte counters of this process (the trainer's own when num_workers=0); each batch also
# carries its counts, so they add up across workers. Tests use them to prove what was read.
DECODED = {"samples": 0, "latent_bytes": 0, "target_bytes": 0}
_PENDING_SKIPS: list[str] = []  # keys dropped by the tar handler, reported with the next sample


class CorruptSample(ValueError):
    """A shard sample that fails its checksum or cannot be read; names the shard and the key."""


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
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)  # empty: latents only
    shuffle_buffer: int = 1000
    num_workers: int = 0
    pin_memory: bool = False
    on_corrupt: str = "stop"


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


def npy(data: bytes) -> np.ndarray:
    """A read-only view of an .npy member (no copy: the batch is stacked from these views)."""
    fh = io.BytesIO(data[:4096])
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        return np.load(io.BytesIO(data), allow_pickle=False)
    if fortran:
        raise ValueError("Fortran-ordered arrays are not part of the shard contract")
    return np.frombuffer(data, dtype=dtype, offset=fh.tell()).reshape(shape)


def _where(sample: dict[str, Any]) -> str:
    url = str(sample.get("__url__", "?"))
    return f"shard {url.rsplit('/', 1)[-1]} sample {sample.get('__key__', '?')}"


class DecodeSamples:
    """Verify each sample's crc32 and decode it to compact arrays (a pipeline stage).

    `encoders` are the layout entries of the targets to decode (none: latents only). Corrupt
    samples raise CorruptSample, or with on_corrupt="skip" are dropped and their keys ride along
    with the next good sample ("skipped") so the trainer can log them."""

    def __init__(self, encoders: dict[str, dict[str, Any]], on_corrupt: str):
        self.encoders, self.on_corrupt = encoders, on_corrupt

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        problem = verify_checksum(sample)
        if problem is not None:
            raise CorruptSample(f"{_where(sample)} is corrupt: {problem}")
        try:
            latent = npy(sample[C.SAMPLE_LATENT])
            targets = {}
            for name, entry in self.encoders.items():
                values = npy(sample[C.sample_values(name)])
                scales = npy(sample[C.sample_scales(name)]) if entry.get("scales") else None
                targets[name] = (values, scales)
        except KeyError as exc:
            raise CorruptSample(f"{_where(sample)} has no {exc.args[0]} (not a schema-v2 sample)") from None
        cls = sample.get(C.SAMPLE_CLASS)
        label = -1 if cls is None else int(cls.decode() if isinstance(cls, bytes) else cls)
        target_bytes = sum(v.nbytes + (0 if s is None else s.nbytes) for v, s in targets.values())
        DECODED["samples"] += 1
        DECODED["latent_bytes"] += latent.nbytes
        DECODED["target_bytes"] += target_bytes
        return {"latent": latent, "targets": targets, "label": label, "target_bytes": target_bytes}

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            try:
                decoded = self.decode(sample)
            except CorruptSample as exc:
                if self.on_corrupt == "stop":
                    raise
                _PENDING_SKIPS.append(f"{_where(sample)}: {exc}")
                continue
            decoded["skipped"] = list(_PENDING_SKIPS)
            _PENDING_SKIPS.clear()
            yield decoded


class TarErrors:
    """webdataset handler for unreadable tars: stop naming the shard, or skip and report it."""

    def __init__(self, on_corrupt: str):
        self.on_corrupt = on_corrupt

    def __call__(self, exc: Exception) -> bool:
        text = str(exc.args[0]) if exc.args else type(exc).__name__
        match = re.search(r" @ (\S+)", text)
        shard = match.group(1).rsplit("/", 1)[-1].rstrip(">'\"") if match else "?"
        message = f"shard {shard} is unreadable: {text.split(' @ ')[0]}"
        if self.on_corrupt == "stop":
            raise CorruptSample(message)
        _PENDING_SKIPS.append(message)
        return True


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack compact arrays (one copy, no dtype change); targets stay {name: (values, scales)}."""
    first = samples[0]
    targets = {}
    for name, (_, scales) in first["targets"].items():
        values = torch.from_numpy(np.stack([s["targets"][name][0] for s in samples]))
        stacked = (
            None if scales is None else torch.from_numpy(np.stack([s["targets"][name][1] for s in samples]))
        )
        targets[name] = (values, stacked)
    return {
        "latent": torch.from_numpy(np.stack([s["latent"] for s in samples])),
        "targets": targets,
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "skipped": [k for s in samples for k in s["skipped"]],
        "target_bytes": sum(s["target_bytes"] for s in samples),
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
        wds.tarfile_to_samples(handler=TarErrors(spec.on_corrupt)),
        SeededShuffle(spec.seed, segment, spec.shuffle_buffer),
        DecodeSamples(spec.encoders, spec.on_corrupt),
        wds.batched(spec.batch_size, collation_fn=collate, partial=False),
    )


def build_loader(spec: LoaderSpec, segment: int) -> DataLoader:
    """A DataLoader over one segment's stream; batches come from the workers in a fixed order."""
    return DataLoader(
        build_dataset(spec, segment),
        batch_size=None,
        num_workers=spec.num_workers,
        pin_memory=spec.pin_memory,
        # A private generator keeps the loader from consuming the global torch RNG.
        generator=torch.Generator().manual_seed(derive_seed("loader", spec.seed, segment)),
        worker_init_fn=worker_init if spec.num_workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=4 if spec.num_workers > 0 else None,
    )


def iterate_steps(
    spec: LoaderSpec, start_step: int, lean: LoaderSpec | None = None, switch_after: int | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Yield, for step = start_step + 1, ..., the micro-batches of that optimizer step.

    With `lean` and `switch_after`, steps after `switch_after` read the `lean` (latents-only)
    stream instead. Workers are shut down when the generator is closed (call `.close()`)."""
    step, current, it = start_step, None, None
    try:
        while True:
            use = lean if (lean is not None and switch_after is not None and step >= switch_after) else spec
            segment = step // spec.segment_steps
            if current != (id(use), segment):
                if it is not None:
                    close_loader(it)
                it = iter(build_loader(use, segment))
                current = (id(use), segment)
                for _ in range((step - segment * spec.segment_steps) * spec.batches_per_step):
                    next(it)  # replay the part of the segment consumed before a resume or switch
            yield [next(it) for _ in range(spec.batches_per_step)]
            step += 1
    finally:
        if it is not None:
            close_loader(it)


def latents_only(spec: LoaderSpec, lean_urls: list[str]) -> LoaderSpec:
    """The same stream over the latents-only shard set."""
    return replace(spec, urls=lean_urls, encoders={})
