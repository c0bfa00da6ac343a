"""Spatial-structure metrics of encoder tokens, as iREPA uses them to rank encoders for alignment.

Definitions follow iREPA `metrics/spatial_metrics.py` (End2End-Diffusion/iREPA), with the parameters
of its `metrics/spatial_metrics_comparison.py` (far_dist=6, dmax=8). One frame's H x W token grid is
one iREPA "image"; tokens are L2-normalised (eps 1e-8) and d(i, j) = |row_i - row_j| + |col_i - col_j|
is the Manhattan distance on the grid; cos(i, j) the cosine of tokens i and j.

* LDS (Local-vs-Distant Similarity) = mean cos over 4-neighbour pairs (d = 1)
  - mean cos over ordered pairs with d >= far_dist (iREPA `metric_lds`). Higher: more local structure.
* CDS (Correlation-Decay Slope) = -slope of the least-squares line through (d, mean cos at distance d)
  for the distances d = 1..dmax present on the grid (iREPA `metric_cds`). Higher: faster decay.
* RMSC (RMS Spatial Contrast) = sqrt(mean_i |u_i - mean_j u_j|^2) of the unit tokens u
  (iREPA `metric_rmsc`, sqrt=True). Higher: more diverse tokens.
* SRSS needs foreground masks, which the cache does not have, so it is not computed.

Each metric is computed per frame and averaged over all frames of all clips (iREPA averages per image).
All three are linear in per-frame sums (CDS because the least-squares slope is linear in the
ordinates), so blocks reduce to partial sums: :func:`spatial_metrics_block` on each block of the
cache, then :func:`combine` — the same value as the one-shot :func:`spatial_metrics`.

Deviations: where the grid has no pair at d >= far_dist LDS is None (iREPA would report the local term
alone), and CDS is None with fewer than two distances (iREPA would report 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

FAR_DIST = 6  # iREPA spatial_metrics_comparison.py: "lds": {"far_dist": 6}
DMAX = 8  # iREPA spatial_metrics_comparison.py: "cds": {"dmax": 8}
_GRAM_BUDGET = 1 << 23  # Gram entries per chunk of frames (32 MiB in float32)


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _unit(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _distance_bins(h: int, w: int, far_dist: int, dmax: int) -> np.ndarray:
    """Indicator matrix [P*P, dmax + 1]: column d-1 marks ordered pairs at distance d, the last marks
    pairs at distance >= far_dist (self pairs, d = 0, are in none)."""
    rows, cols = np.divmod(np.arange(h * w), w)
    dist = (np.abs(rows[:, None] - rows[None, :]) + np.abs(cols[:, None] - cols[None, :])).reshape(-1)
    bins = np.zeros((dist.size, dmax + 1), dtype=np.float32)
    for d in range(1, dmax + 1):
        bins[:, d - 1] = dist == d
    bins[:, dmax] = (dist >= far_dist) & (dist > 0)
    return bins


def _frame_sums(frames: np.ndarray, far_dist: int, dmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """frames [F, H, W, D] -> (mean cos per distance 1..dmax and far [F, dmax+1], RMSC [F], pair counts)."""
    f, h, w, d = frames.shape
    p = h * w
    bins = _distance_bins(h, w, far_dist, dmax)
    counts = bins.sum(axis=0).astype(np.float64)
    means = np.empty((f, dmax + 1), dtype=np.float64)
    rmsc = np.empty(f, dtype=np.float64)
    step = max(1, _GRAM_BUDGET // (p * p))
    for lo in range(0, f, step):
        u = _unit(frames[lo : lo + step].reshape(-1, p, d))
        gram = np.matmul(u, u.transpose(0, 2, 1)).reshape(u.shape[0], p * p)
        sums = (gram @ bins).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            means[lo : lo + step] = sums / counts
        centred = u - u.mean(axis=1, keepdims=True)
        rmsc[lo : lo + step] = np.sqrt(np.einsum("fpd,fpd->fp", centred, centred).mean(-1, dtype=np.float64))
    return means, rmsc, counts


def _slope_weights(counts: np.ndarray, dmax: int) -> np.ndarray | None:
    """Least-squares slope as a linear map of the per-distance means (None below 2 distances)."""
    present = counts[:dmax] > 0
    if present.sum() < 2:
        return None
    x = np.arange(1, dmax + 1, dtype=np.float64)
    x0 = np.where(present, x - x[present].mean(), 0.0)
    return x0 / (x0 @ x0)


def frame_metrics(feats: Any, far_dist: int = FAR_DIST, dmax: int = DMAX) -> dict[str, np.ndarray | None]:
    """Per-frame LDS, CDS and RMSC of tokens [..., H, W, D] -> arrays of shape [...] (None if undefined)."""
    x = _as_numpy(feats)
    if x.ndim < 3:
        raise ValueError(f"expected tokens [..., H, W, D], got shape {x.shape}")
    lead, (h, w, d) = x.shape[:-3], x.shape[-3:]
    if h * w < 2:
        raise ValueError(f"spatial metrics need at least 2 tokens per frame, got a {h}x{w} grid")
    means, rmsc, counts = _frame_sums(x.reshape(-1, h, w, d), far_dist, dmax)
    slope = _slope_weights(counts, dmax)
    lds = means[:, 0] - means[:, dmax] if counts[dmax] > 0 else None
    cds = -(np.nan_to_num(means[:, :dmax]) @ slope) if slope is not None else None
    return {
        "lds": None if lds is None else lds.reshape(lead),
        "cds": None if cds is None else cds.reshape(lead),
        "rmsc": rmsc.reshape(lead),
    }


def spatial_metrics_block(block: Any, far_dist: int = FAR_DIST, dmax: int = DMAX) -> dict[str, Any]:
    """Partial sums of one block of clips [n, T, H, W, D] (numpy or torch); feed a list to :func:`combine`."""
    x = _as_numpy(block)
    if x.ndim != 5:
        raise ValueError(f"expected a block of clips [n, T, H, W, D], got shape {x.shape}")
    h, w, d = x.shape[2:]
    if h * w < 2:
        raise ValueError(f"spatial metrics need at least 2 tokens per frame, got a {h}x{w} grid")
    means, rmsc, counts = _frame_sums(x.reshape(-1, h, w, d), far_dist, dmax)
    return {
        "grid": (int(h), int(w)),
        "dim": int(d),
        "far_dist": int(far_dist),
        "dmax": int(dmax),
        "clips": int(x.shape[0]),
        "frames": int(means.shape[0]),
        "pair_counts": counts,
        "cos_sum": np.nan_to_num(means).sum(axis=0),  # [dmax + 1]: per distance 1..dmax, then far
        "rmsc_sum": float(rmsc.sum()),
    }


def merge_partials(partials: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum partials of blocks of the same grid and parameters (for tree reductions)."""
    parts = list(partials)
    if not parts:
        raise ValueError("no partial sums to merge")
    first = parts[0]
    for q in parts[1:]:
        for key in ("grid", "dim", "far_dist", "dmax"):
            if q[key] != first[key]:
                raise ValueError(f"partials disagree on {key}: {first[key]} vs {q[key]}")
    return {
        **{k: first[k] for k in ("grid", "dim", "far_dist", "dmax", "pair_counts")},
        "clips": sum(q["clips"] for q in parts),
        "frames": sum(q["frames"] for q in parts),
        "cos_sum": np.sum([q["cos_sum"] for q in parts], axis=0),
        "rmsc_sum": float(sum(q["rmsc_sum"] for q in parts)),
    }


def combine(partials: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Metrics (means over all frames) from the partial sums of every block."""
    m = merge_partials(partials)
    dmax, counts, frames = m["dmax"], m["pair_counts"], m["frames"]
    mean_cos = m["cos_sum"] / frames
    slope = _slope_weights(counts, dmax)
    has_far = counts[dmax] > 0
    return {
        "clips": m["clips"],
        "frames": frames,
        "grid": list(m["grid"]),
        "dim": m["dim"],
        "far_dist": m["far_dist"],
        "dmax": dmax,
        "lds": float(mean_cos[0] - mean_cos[dmax]) if has_far else None,
        "cds": float(-(mean_cos[:dmax] @ slope)) if slope is not None else None,
        "rmsc": m["rmsc_sum"] / frames,
        "local_cos": float(mean_cos[0]),
        "far_cos": float(mean_cos[dmax]) if has_far else None,
        "cos_at_distance": [
            float(c) if n > 0 else None for c, n in zip(mean_cos[:dmax], counts[:dmax], strict=True)
        ],
    }


def spatial_metrics(feats: Any, far_dist: int = FAR_DIST, dmax: int = DMAX) -> dict[str, Any]:
    """One-shot metrics of in-memory clips [N, T, H, W, D] (numpy or torch)."""
    return combine([spatial_metrics_block(feats, far_dist, dmax)])


def spatial_from_store(
    path: str, encoders: list[str] | None = None, block_clips: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """The metrics per encoder over a feature store, blockwise with dask like IICR (targets as the
    trainer reconstructs them, valid clips only)."""
    from stages.common.progress import tqdm
    from stages.evaluate.store_targets import open_targets

    store = open_targets(path, encoders, block_clips)
    partials: dict[str, list[dict[str, Any]]] = {name: [] for name in store.encoders}
    total = -(-store.num_clips // store.block_clips)
    for _, _, dense in tqdm(store.blocks(), total=total, desc="spatial", unit="block", disable=not progress):
        for name, block in dense.items():
            partials[name].append(spatial_metrics_block(block))
    return {
        "store": str(path),
        "grid": list(store.grid),
        "encoders": {name: combine(parts) for name, parts in partials.items() if parts},
    }
