"""Where a stage runs: device resolution, torchrun process groups, loader workers, config dumps.

Written once here because every stage needs the same answers (DESIGN.md section 2):

- a device string is validated before anything starts (`--device tpu` is a usage error, not
  a traceback deep inside torch);
- ranks of one torchrun job agree on failures: `run_on_main` runs a check on rank 0 and
  raises the same error on every rank, so no rank waits forever at a barrier;
- DataLoader workers never outlive their parent (PR_SET_PDEATHSIG, also after kill -9) and
  never keep a failed process alive: `close_loader` kills what is left of them at once.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from stages.common.registry import DEVICE_HELP

T = TypeVar("T")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def check_device(name: str) -> str:
    """The device string if it names a device we can run on; ValueError naming it otherwise."""
    if not isinstance(name, str) or not _DEVICE.match(name.strip()):
        raise ValueError(f"device: {name!r} is not one of {DEVICE_HELP}")
    return name.strip()


def resolve_device(name: str = "auto", local_rank: int = 0):
    """'auto' is this rank's GPU when there is one, else the CPU; a missing GPU is a clear error."""
    import torch

    name = check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {name!r} was asked for but no CUDA GPU is available (use --device cpu)"
            )
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    return torch.device(name)


# --------------------------------------------------------------------------- torchrun


@dataclass
class DistInfo:
    """This process's place in a torchrun job (world_size 1 without torchrun)."""

    rank: int
    world_size: int
    local_rank: int
    device: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def setup_distributed(device_name: str = "auto") -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPUs)."""
    import torch
    import torch.distributed as dist

    rank, world, local = env_rank()
    device = resolve_device(device_name, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def teardown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just [obj] without a process group)."""
    if not _initialized():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(
    fn: Callable[[], T], share: bool = False, error_types: tuple[type[BaseException], ...] = (Exception,)
) -> T | None:
    """Run `fn` on rank 0; if it raises one of `error_types`, every rank raises it (same message).
    With `share`, every rank gets rank 0's (picklable) result; otherwise the others get None.

    Why: a check that fails on rank 0 alone (a refused --out, a held lock) would otherwise leave
    the other ranks waiting at the next collective forever.
    """
    result, failure = None, None
    if env_rank()[0] == 0:
        try:
            result = fn()
        except error_types as exc:
            failure = exc
    outcome = (type(failure), str(failure)) if failure is not None else ("ok", result if share else None)
    outcomes = all_gather_objects(outcome)
    if failure is not None:
        raise failure
    if outcomes[0][0] == "ok":
        return result if env_rank()[0] == 0 else outcomes[0][1]
    exc_type, message = outcomes[0]
    try:
        error = exc_type(message)
    except TypeError:  # an exception class with another signature
        error = RuntimeError(message)
    raise error


def job_id() -> str:
    """What the ranks of one torchrun job share and another job does not (locks use it)."""
    env = os.environ
    parts = [env.get("TORCHELASTIC_RUN_ID", ""), env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")]
    if env_rank()[1] > 1 and any(parts):
        return "torchrun:" + ":".join(parts)
    return f"pid:{os.getpid()}"


# --------------------------------------------------------------------------- loader workers

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; no-op elsewhere).
    `parent`: the pid that started us, when this runs late (after a spawn child's imports): a
    parent already gone by then has left us with another one, and we exit at once."""
    parent = os.getppid() if parent is None else parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def process_pool(workers: int | None = None):
    """A spawn-context process pool whose workers die with this process (also after kill -9).

    Why: dask's own "processes" pool leaves its spawn workers, blocked on a futex, with parent pid
    1 when the parent is killed; with them gone, multiprocessing's resource tracker sees its pipe
    close and exits too."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        max_workers=workers or os.cpu_count() or 1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    )


def worker_init(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: die with the parent; leave SIGINT/SIGTERM to the parent.

    The main process handles Ctrl-C and a scheduler's SIGTERM by finishing the step and
    checkpointing, then shuts its workers down itself (`close_loader`)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def close_loader(iterator: Any) -> None:
    """Shut down a DataLoader iterator's workers now, killing any that do not exit.

    torch's own shutdown sends SIGTERM (ignored by our workers, see `worker_init`) and then the
    interpreter's exit joins them forever; this is how a failed run used to hang."""
    workers = list(getattr(iterator, "_workers", []) or [])
    if not workers:
        return
    from torch.utils.data import _utils

    if getattr(iterator, "_worker_pids_set", False):
        _utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join(timeout=5)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def worker_error_message(exc: BaseException) -> str:
    """The original message of an error a DataLoader worker raised (torch wraps it in 'Caught X in
    DataLoader worker process N. Original Traceback ...'); other errors' own message."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    name = type(exc).__name__
    marker = f"{name}: "
    return last.split(marker, 1)[1] if marker in last else last


# --------------------------------------------------------------------------- config, disk


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a (nested) dataclass config."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(data, default=str))


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML: the record every output carries (atomic replace)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem holding `path` (its nearest existing parent); None for URLs."""
    p = str(path)
    if "://" in p:
        return None
    current = Path(p).absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return shutil.disk_usage(current).free


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when wrapped by a library (walks __cause__/__context__)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (28, 122):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def disk_full_message(exc: BaseException, where: str | None, resume: str) -> str:
    """'disk full while writing FILE: N free on that filesystem. RESUME'. FILE is the error's own
    file name, else `where` (the output folder); the free space is measured on that path's
    filesystem, never on another one (unknown when neither is known)."""
    inner = exc
    while inner is not None and not (isinstance(inner, OSError) and inner.errno in (28, 122)):
        inner = inner.__cause__ or inner.__context__
    target = getattr(inner, "filename", None) or where
    free = None if target is None else free_bytes(target)
    shown = "unknown" if free is None else human_bytes(free)
    return f"disk full while writing {target or 'the output'}: {shown} free on that filesystem. {resume}"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as `df -h` shows them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
