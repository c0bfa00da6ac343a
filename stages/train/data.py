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
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from cache_schema import constants as C
from cache_schema.checksum import verify_checksum
from cache_schema.errors import CacheError
from cache_schema.layout import EncoderEntry, ShardLayout, TextEntry
from cache_schema.tars import TarFormatError, iter_samples, open_shard
from cache_schema.text import pad
from stages.common.runtime import close_loader, worker_init


class CorruptSample(ValueError):
    """A shard sample that fails its checksum or cannot be read; names the shard and the key."""


class SkipLog:
    """What one stream dropped under on_corrupt="skip" (unreadable shards, corrupt samples) and has
    not reported yet. One instance is shared by the stream's ReadShards and DecodeSamples stages
    (each loader worker holds its own copy of the stream); the messages ride along with the next
    good sample, so the trainer logs them."""

    def __init__(self) -> None:
        self.pending: list[str] = []

    def add(self, message: str) -> None:
        self.pending.append(message)

    def take(self) -> list[str]:
        taken, self.pending = self.pending, []
        return taken


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any printable parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def shard_urls(shards: str, index: ShardLayout) -> list[str]:
    """Full paths/URLs of the shards listed in index.json."""
    names = [s.name for s in index.shards if s.samples > 0]
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
    encoders: dict[str, EncoderEntry] = field(default_factory=dict)  # empty: latents only
    norms: bool = False  # also decode the token norms (raw targets for --target-norm spatial)
    text: TextEntry | None = None  # decode each sample's prompt embeddings and mask
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

    `encoders` are the layout entries of the targets to decode (none: latents only); with `norms`,
    the token norms of encoders that store them are decoded too. Corrupt samples raise
    CorruptSample, or with on_corrupt="skip" are dropped and their keys ride along with the next
    good sample ("skipped", through the stream's SkipLog) so the trainer can log them."""

    def __init__(
        self,
        encoders: dict[str, EncoderEntry],
        on_corrupt: str,
        skips: SkipLog,
        norms: bool = False,
        text: TextEntry | None = None,
    ):
        self.encoders, self.on_corrupt, self.skips, self.norms = encoders, on_corrupt, skips, norms
        self.text = text

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        problem = verify_checksum(sample)
        if problem is not None:
            raise CorruptSample(f"{_where(sample)} is corrupt: {problem}")
        try:
            latent = npy(sample[C.SAMPLE_LATENT])
            targets = {}
            for name, entry in self.encoders.items():
                values = npy(sample[entry.values_member])
                scales = npy(sample[entry.scales_member]) if entry.scales else None
                norms = npy(sample[entry.norms_member]) if self.norms and entry.stores_norms else None
                targets[name] = (values, scales, norms)
            text = None
            if self.text is not None:
                mask = npy(sample[C.SAMPLE_TEXT_MASK])
                text = (pad(npy(sample[C.SAMPLE_TEXT]), mask, _where(sample)), mask)
        except CacheError as exc:
            raise CorruptSample(str(exc)) from None
        except KeyError as exc:
            raise CorruptSample(f"{_where(sample)} has no {exc.args[0]} (not a schema-v2 sample)") from None
        cls = sample.get(C.SAMPLE_CLASS)
        label = -1 if cls is None else int(cls.decode() if isinstance(cls, bytes) else cls)
        target_bytes = sum(a.nbytes for parts in targets.values() for a in parts if a is not None)
        decoded = {"latent": latent, "targets": targets, "label": label, "target_bytes": target_bytes}
        return decoded if text is None else {**decoded, "text": text}

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            try:
                decoded = self.decode(sample)
            except CorruptSample as exc:
                if self.on_corrupt == "stop":
                    raise
                self.skips.add(str(exc))
                continue
            decoded["skipped"] = self.skips.take()
            yield decoded


class ReadShards:
    """Shard URLs -> samples, with our fast tar reader (cache_schema.tars). An unreadable or
    truncated tar stops the run naming the shard, or with on_corrupt="skip" is reported and the
    stream goes on with the next shard."""

    def __init__(self, on_corrupt: str, skips: SkipLog):
        self.on_corrupt, self.skips = on_corrupt, skips

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for shard in src:
            url = shard["url"]
            try:
                with open_shard(url) as fh:
                    yield from iter_samples(fh, url)
            except (OSError, TarFormatError) as exc:
                message = f"shard {url.rsplit('/', 1)[-1]} is unreadable: {exc}"
                if self.on_corrupt == "stop":
                    raise CorruptSample(message) from None
                self.skips.add(message)


TARGET_ROLES = ("values", "scales", "norms")  # a decoded target: (values, scales | None, norms | None)
TEXT_KEY, TEXT_ROLES = "text", ("embeds", "mask")  # a decoded prompt: (embeds [L, D], mask [L])


def _alloc(nbytes: int) -> torch.Tensor:
    """A uint8 buffer; in a loader worker, straight in shared memory (no copy on the way out)."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:
        return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))
    return torch.empty(nbytes, dtype=torch.uint8)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """All of a batch's arrays in ONE contiguous uint8 buffer (16-byte aligned parts), plus their
    layout: one shared-memory hand-off from the worker, one pinned copy, one host-to-device copy.
    `unpack` turns it back into tensors (on any device) without copying."""
    n = len(samples)
    parts: list[tuple[str, str | None, np.dtype, tuple[int, ...]]] = [
        ("latent", None, *_meta(samples[0]["latent"]))
    ]
    if "text" in samples[0]:  # before the targets: read also once alignment has ended
        parts += [(TEXT_KEY, role, *_meta(a)) for role, a in zip(TEXT_ROLES, samples[0]["text"], strict=True)]
    for name, arrays in samples[0]["targets"].items():
        for role, array in zip(TARGET_ROLES, arrays, strict=True):
            if array is not None:
                parts.append((name, role, *_meta(array)))
    layout, offset = [], 0
    for key, role, dtype, shape in parts:
        layout.append((key, role, dtype.str, shape, offset))
        offset += -(-n * int(np.prod(shape)) * dtype.itemsize // 16) * 16
    buffer = _alloc(offset)
    flat = buffer.numpy()
    for key, role, dtype, shape, start in layout:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        for i, sample in enumerate(samples):
            src = _source(sample, key, role)
            flat[start + i * size : start + (i + 1) * size] = src.reshape(-1).view(np.uint8)
    return {
        "buffer": buffer,
        "layout": layout,
        "batch_size": n,
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "skipped": [k for s in samples for k in s["skipped"]],
        "target_bytes": sum(s["target_bytes"] for s in samples),
    }


def _meta(array: np.ndarray) -> tuple[np.dtype, tuple[int, ...]]:
    return array.dtype, tuple(array.shape)


def _source(sample: dict[str, Any], key: str, role: str | None) -> np.ndarray:
    if role is None:
        return sample["latent"]
    if key == TEXT_KEY and role in TEXT_ROLES:
        return sample["text"][TEXT_ROLES.index(role)]
    return sample["targets"][key][TARGET_ROLES.index(role)]


def leading_parts(batch: dict[str, Any]) -> int:
    """How many of the batch buffer's parts come before the targets (the latents, the prompt)."""
    return sum(1 for key, role, *_ in batch["layout"] if role is None or key == TEXT_KEY)


def _view(batch: dict[str, Any], buffer: torch.Tensor, part: tuple) -> torch.Tensor:
    _, _, dtype, shape, start = part
    size = batch["batch_size"] * int(np.prod(shape)) * np.dtype(dtype).itemsize
    return buffer[start : start + size].view(_TORCH_DTYPES[np.dtype(dtype)]).view(batch["batch_size"], *shape)


def unpack_text(
    batch: dict[str, Any], buffer: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(embeds float16 [B, L, D], mask uint8 [B, L]) as views of `buffer`, or None without text."""
    buffer = batch["buffer"] if buffer is None else buffer
    parts = {p[1]: p for p in batch["layout"] if p[0] == TEXT_KEY}
    if not parts:
        return None
    return _view(batch, buffer, parts["embeds"]), _view(batch, buffer, parts["mask"])


def unpack(
    batch: dict[str, Any], buffer: torch.Tensor | None = None, with_targets: bool = True
) -> tuple[torch.Tensor, dict]:
    """(latents [B, ...], {encoder: (values, scales | None, norms | None)}) as views of `buffer`
    (default: the batch's own; pass the batch buffer moved to a device to get device tensors).
    Without targets, only the latents (the buffer's first part) are read."""
    buffer = batch["buffer"] if buffer is None else buffer
    n, latent, targets = batch["batch_size"], None, {}
    for key, role, dtype, shape, start in batch["layout"][: None if with_targets else leading_parts(batch)]:
        if key == TEXT_KEY:  # unpack_text
            continue
        torch_dtype = _TORCH_DTYPES[np.dtype(dtype)]
        size = n * int(np.prod(shape)) * np.dtype(dtype).itemsize
        view = buffer[start : start + size].view(torch_dtype).view(n, *shape)
        if role is None:
            latent = view
        else:
            parts = targets.setdefault(key, [None] * len(TARGET_ROLES))
            parts[TARGET_ROLES.index(role)] = view
    return latent, {key: tuple(parts) for key, parts in targets.items()}


_TORCH_DTYPES = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
}


def build_dataset(spec: LoaderSpec, segment: int) -> wds.DataPipeline:
    """The infinite sample stream of one segment."""
    skips = SkipLog()  # what ReadShards drops is reported by DecodeSamples with the next sample
    return wds.DataPipeline(
        wds.ResampledShards(
            spec.urls,
            seed=derive_seed("shards", spec.seed, segment),
            worker_seed=_constant_worker_seed,
            deterministic=True,
        ),
        wds.split_by_node,
        wds.split_by_worker,
        ReadShards(spec.on_corrupt, skips),
        SeededShuffle(spec.seed, segment, spec.shuffle_buffer),
        DecodeSamples(spec.encoders, spec.on_corrupt, skips, spec.norms, spec.text),
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


class DevicePrefetch:
    """Steps of micro-batches whose bytes are already on the device: while step k computes, the
    batches of step k+1 are copied host-to-device on a side CUDA stream (pinned memory), so the
    transfer costs the step nothing. On the CPU it only passes the batches through."""

    def __init__(self, steps: Iterator[list[dict[str, Any]]], device: torch.device):
        self.steps, self.device = steps, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._next: list[dict[str, Any]] | None = None

    def _load(self) -> list[dict[str, Any]]:
        batches = next(self.steps)
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                for batch in batches:
                    batch["device_buffer"] = batch["buffer"].to(self.device, non_blocking=True)
        return batches

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        current = self._next if self._next is not None else self._load()
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            for batch in current:
                batch["device_buffer"].record_stream(compute)
        self._next = self._load()  # the next step's copy starts now, behind this step's compute
        return current

    def close(self) -> None:
        self.steps.close()


def empty_prompt(shards: str, index: ShardLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The shard set's empty-prompt embedding (float32 [L, D]) and mask (bool [L]): the condition a
    text model is given when classifier-free guidance drops a caption. Hash-checked."""
    from cache_schema.text import shard_empty_prompt

    embeds, mask = shard_empty_prompt(shards, index)
    return torch.from_numpy(embeds.astype(np.float32)), torch.from_numpy(mask.astype(bool))


def latents_only(spec: LoaderSpec, lean_urls: list[str]) -> LoaderSpec:
    """The same stream over the latents-only shard set."""
    return replace(spec, urls=lean_urls, encoders={})
