"""Shards -> batches: a global sample order that does not depend on the number of ranks or
loader workers, read by random access into the WebDataset tars, checksummed (schema v2).

Why a global order (elastic resume): epoch e visits every sample of the shard set once, in a
seeded order that depends only on (seed, e, the shards' sample counts, shuffle_buffer): the shards
in a seeded permutation, then each window of `shuffle_buffer` consecutive samples shuffled (a
shuffle buffer that needs no stream state, as Mosaic streaming's block shuffle). The epochs follow
each other as one endless sequence of positions. Global micro-batch j is positions [j G, (j+1) G)
with G = batch_size x world_size (per-rank batch times ranks: the global batch), and rank r takes
the r-th slice of batch_size positions. A checkpoint records the position (samples consumed), so a
run resumed on any number of ranks whose per-rank batch keeps G continues the same sequence of
global batches: no sample is seen twice or skipped within an epoch. A rank reads only its own
samples: each shard's sample byte ranges are found once from its tar headers, then a sample is one
read. Loader worker w of W makes micro-batches j = w, w + W, ... and the DataLoader hands them out
round-robin, so the number of workers does not change the batches either. Once alignment ends
(`--align-until`), the stream switches to the latents-only shard set, which holds the same samples
in the same shards and order, so positions mean the same samples on both sides of the switch.

Samples stay compact all the way to the device: latents as float16, targets as their stored
format (float16, int8 or packed int4 plus scales); the trainer dequantises on the device. Every
sample's crc32 is checked as it is decoded (the bytes are already in hand): a corrupt sample
stops the run naming its shard and key, or with `on_corrupt="skip"` is dropped from its batch and
reported with it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cache_schema import constants as C
from cache_schema.checksum import verify_checksum
from cache_schema.errors import CacheError
from cache_schema.layout import EncoderEntry, ShardLayout, TextEntry
from cache_schema.tars import TarFormatError, open_shard_random, read_sample, scan_samples
from cache_schema.text import pad
from stages.common.runtime import close_loader, worker_init

ORDER = "global-v1"  # the checkpoint's name for this data order (loader_state)


class CorruptSample(ValueError):
    """A shard sample that fails its checksum or cannot be read; names the shard and the key."""


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any printable parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _listed(index: ShardLayout) -> list:
    return [s for s in index.shards if s.samples > 0]


def shard_urls(shards: str, index: ShardLayout) -> list[str]:
    """Full paths/URLs of the shards listed in index.json."""
    names = [s.name for s in _listed(index)]
    if not names:
        raise ValueError(f"{shards}: index.json lists no non-empty shards")
    return [f"{str(shards).rstrip('/')}/{name}" for name in names]


def shard_counts(index: ShardLayout) -> list[int]:
    """Samples per shard of `shard_urls`, as index.json records them (the global order's domain)."""
    return [int(s.samples) for s in _listed(index)]


@dataclass
class LoaderSpec:
    """What the batches depend on. The order depends on `counts`, `seed` and `shuffle_buffer`
    only; `batch_size` x `world_size` is the global micro-batch, `rank` picks this rank's slice."""

    urls: list[str]
    counts: list[int]  # samples per shard, as index.json says
    seed: int
    batch_size: int  # per rank, per micro-batch
    batches_per_step: int  # gradient accumulation micro-batches per optimizer step
    encoders: dict[str, EncoderEntry] = field(default_factory=dict)  # empty: latents only
    norms: bool = False  # also decode the token norms (raw targets for --target-norm spatial)
    text: TextEntry | None = None  # decode each sample's prompt embeddings and mask
    shuffle_buffer: int = 1000  # samples shuffled together (a window of the shard-permuted order)
    num_workers: int = 0
    pin_memory: bool = False
    on_corrupt: str = "stop"
    rank: int = 0
    world_size: int = 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size


class SampleOrder:
    """Global position -> (shard, sample within the shard); see the module docstring."""

    def __init__(self, counts: list[int], seed: int, window: int):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.total, self.seed, self.window = int(self.counts.sum()), seed, max(1, window)
        if self.total <= 0:
            raise ValueError("the shard set holds no samples")
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()

    def epoch(self, e: int) -> np.ndarray:
        """Epoch e's global sample ids in visiting order (the last two epochs are cached)."""
        if e not in self._epochs:
            rng = np.random.default_rng(derive_seed("order", self.seed, e))
            shards = rng.permutation(len(self.counts))
            ids = np.concatenate([np.arange(self.starts[s], self.starts[s] + self.counts[s]) for s in shards])
            window = np.arange(self.total) // self.window
            self._epochs[e] = ids[np.lexsort((rng.random(self.total), window))]
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def locate(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.total)
        sample = int(self.epoch(epoch)[offset])
        shard = int(np.searchsorted(self.starts, sample, side="right")) - 1
        return shard, sample - int(self.starts[shard])


class ShardFiles:
    """Random access to the samples of a shard set in one process: each shard's sample ranges are
    read once from its headers (`scan_samples`), a few files stay open."""

    def __init__(self, urls: list[str], keep_open: int = 8):
        self.urls, self.keep_open = urls, keep_open
        self.ranges: dict[int, tuple[list[tuple[str, int, int]], str | None]] = {}
        self.files: OrderedDict[int, BinaryIO] = OrderedDict()

    def _file(self, shard: int) -> BinaryIO:
        if shard in self.files:
            self.files.move_to_end(shard)
        else:
            self.files[shard] = open_shard_random(self.urls[shard])
            while len(self.files) > self.keep_open:
                self.files.popitem(last=False)[1].close()
        return self.files[shard]

    def read(self, shard: int, i: int) -> dict[str, Any]:
        """Sample i of `shard` as {__key__, __url__, ext: bytes}, or CorruptSample naming it."""
        url = self.urls[shard]
        name = url.rsplit("/", 1)[-1]
        try:
            fh = self._file(shard)
            if shard not in self.ranges:
                self.ranges[shard] = scan_samples(fh, url)
            found, problem = self.ranges[shard]
            if i >= len(found):
                why = problem or f"the tar holds {len(found)} samples, fewer than index.json says"
                raise CorruptSample(f"shard {name} sample #{i} is unreadable: {why}")
            _, start, end = found[i]
            return read_sample(fh, url, start, end)
        except (OSError, TarFormatError) as exc:
            raise CorruptSample(f"shard {name} is unreadable: {exc}") from None

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()
        self.files.clear()


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
    """Verify a sample's crc32 and decode it to compact arrays.

    `encoders` are the layout entries of the targets to decode (none: latents only); with `norms`,
    the token norms of encoders that store them are decoded too. A corrupt sample raises
    CorruptSample naming its shard and key."""

    def __init__(self, encoders: dict[str, EncoderEntry], norms: bool = False, text: TextEntry | None = None):
        self.encoders, self.norms, self.text = encoders, norms, text

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
        decoded = {
            "latent": latent,
            "targets": targets,
            "label": label,
            "target_bytes": target_bytes,
            "key": str(sample.get("__key__")),
        }
        return decoded if text is None else {**decoded, "text": text}


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
        "skipped": [k for s in samples for k in s.get("skipped", [])],
        "keys": [s.get("key") for s in samples],
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


class RankBatches(IterableDataset):
    """This rank's micro-batches from global micro-batch `start` on (see the module docstring).

    Under on_corrupt="skip" a corrupt sample is dropped from its batch (the batch is smaller) and
    its message rides with the batch ("skipped"); a slice whose every sample is corrupt takes this
    rank's slice of the next global batch instead (those samples then come twice)."""

    def __init__(self, spec: LoaderSpec, start: int):
        self.spec, self.start = spec, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        spec = self.spec
        order = SampleOrder(spec.counts, spec.seed, spec.shuffle_buffer)
        files, decode = ShardFiles(spec.urls), DecodeSamples(spec.encoders, spec.norms, spec.text)
        try:
            for j in itertools.count(self.start + worker, workers):
                yield self._batch(j, order, files, decode)
        finally:
            files.close()

    def _batch(self, j: int, order: SampleOrder, files: ShardFiles, decode: DecodeSamples) -> dict[str, Any]:
        samples, skipped, ahead = [], [], j
        while not samples:
            if (ahead - j) * self.spec.global_batch > order.total:
                raise CorruptSample(f"every sample of an epoch is corrupt ({skipped[0]})")
            first = ahead * self.spec.global_batch + self.spec.rank * self.spec.batch_size
            for position in range(first, first + self.spec.batch_size):
                try:
                    samples.append(decode.decode(files.read(*order.locate(position))))
                except CorruptSample as exc:
                    if self.spec.on_corrupt == "stop":
                        raise
                    skipped.append(str(exc))
            ahead += 1
        batch = collate(samples)
        batch["skipped"], batch["position"] = skipped, j * self.spec.global_batch
        return batch


def build_loader(spec: LoaderSpec, start: int = 0) -> DataLoader:
    """A DataLoader of this rank's micro-batches from global micro-batch `start` on."""
    return DataLoader(
        RankBatches(spec, start),
        batch_size=None,
        num_workers=spec.num_workers,
        pin_memory=spec.pin_memory,
        # A private generator keeps the loader from consuming the global torch RNG.
        generator=torch.Generator().manual_seed(derive_seed("loader", spec.seed, start)),
        worker_init_fn=worker_init if spec.num_workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=4 if spec.num_workers > 0 else None,
    )


def iterate_steps(
    spec: LoaderSpec, start_step: int, lean: LoaderSpec | None = None, switch_after: int | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Yield, for step = start_step + 1, ..., the micro-batches of that optimizer step.

    With `lean` and `switch_after`, steps after `switch_after` read the `lean` (latents-only)
    shards instead, at the same positions. Workers are shut down when the generator is closed
    (call `.close()`)."""
    step, current, it = start_step, None, None
    try:
        while True:
            use = lean if (lean is not None and switch_after is not None and step >= switch_after) else spec
            if use is not current:
                if it is not None:
                    close_loader(it)
                it = iter(build_loader(use, step * spec.batches_per_step))
                current = use
            yield [next(it) for _ in range(spec.batches_per_step)]
            step += 1
    finally:
        if it is not None:
            close_loader(it)


def loader_state(spec: LoaderSpec, step: int) -> dict[str, Any]:
    """The data position a checkpoint of `step` records (train_state.pt "loader")."""
    position = step * spec.batches_per_step * spec.global_batch
    total = sum(spec.counts)
    return {
        "order": ORDER,
        "seed": spec.seed,
        "position": position,  # samples consumed by all ranks together
        "epoch": position // total,
        "samples_per_epoch": total,
        "global_batch": spec.global_batch,
        "world_size": spec.world_size,
    }


def resumed_position(saved: dict[str, Any], spec: LoaderSpec, step: int) -> str | None:
    """Why a checkpoint's loader position cannot continue this stream at `step` (None: it does).
    A checkpoint written before the global order (no "order") resumes at step x global batch; a
    shard set that changed since (another samples_per_epoch) continues at the same position, as the
    trainer warns."""
    if saved.get("order") != ORDER:
        return None
    expected = loader_state(spec, step)
    for key in ("position", "global_batch"):
        if int(saved.get(key, -1)) != expected[key]:
            return (
                f"the checkpoint's loader {key} is {saved.get(key)}, but step {step} of this run means "
                f"{expected[key]}"
            )
    return None


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


def latents_only(spec: LoaderSpec, lean_urls: list[str], lean_counts: list[int]) -> LoaderSpec:
    """The same stream over the latents-only shard set (same samples per shard: same positions)."""
    if lean_counts != spec.counts:
        raise ValueError(
            f"the latents-only shards ({lean_urls[0].rsplit('/', 2)[0]}) hold {sum(lean_counts)} samples in "
            f"{len(lean_counts)} shards, the full set {sum(spec.counts)} in {len(spec.counts)}: pack them again"
        )
    return replace(spec, urls=lean_urls, encoders={})
