"""What a store's `derived` attribute holds, measured before its first block is written.

From seeded samples of store rows (disjoint while there are enough clips): the PCA bases of each
encoder with ``pca_dims`` (streaming covariance over the fit sample's tokens of the stored
quantity), and on the held-out fidelity sample, per encoder, the cosine between what a trainer
will reconstruct (`formats.reconstruct` of the stored arrays) and the exact float32 target.
"""

from __future__ import annotations

from typing import Any

import torch

from cache_schema import formats

from .job import Job, check_finite, decoding, sample_rows, to_device
from .models import ExtractError, compute_batch, encode_quantity, exact_target


def _batches(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _features(job: Job, rows: list[int]):
    """(decoded store rows, Features) per batch; undecodable clips are left out of the sample."""
    with decoding(job, _batches(rows, job.cfg.batch_size)) as batches:
        for items in batches:
            frames = to_device(job, items)
            if frames is None:
                continue
            clips = [it["index"] for it in items if it["frames"] is not None]
            feats = compute_batch(frames, job.models, job.plans, job.grid, job.timings)
            check_finite(job, feats, clips)
            yield clips, feats


def fit_bases(job: Job, rows: list[int]) -> dict[str, formats.PCABasis]:
    """PCA basis per encoder with pca_dims, fitted on the stored quantity of `rows`."""
    accumulators = {p.name: formats.CovarianceAccumulator() for p in job.plans if p.pca_dims}
    if not accumulators:
        return {}
    clips = 0
    for decoded, feats in _features(job, rows):
        clips += len(decoded)
        for name, acc in accumulators.items():
            acc.update(feats.quantities[name])
    if clips == 0:
        raise ExtractError(f"none of the {len(rows)} clips sampled to fit the PCA bases could be decoded")
    dims = {p.name: p.pca_dims for p in job.plans}
    return {name: acc.fit(int(dims[name])) for name, acc in accumulators.items()}


def measure_fidelity(job: Job, rows: list[int], bases: dict[str, formats.PCABasis]) -> dict[str, Any]:
    """Per encoder: token cosines of the reconstructed stored targets against the exact ones."""
    if not rows:
        return {}
    on_device = {name: formats.basis_tensors(b, job.device) for name, b in bases.items()}
    cosines: dict[str, list[torch.Tensor]] = {p.name: [] for p in job.plans}
    clips = 0
    for decoded, feats in _features(job, rows):
        clips += len(decoded)
        for plan in job.plans:
            q = feats.quantities[plan.name]
            values, scales = encode_quantity(q, plan, on_device.get(plan.name))
            rebuilt = formats.reconstruct(
                values, scales, plan.format, plan.stored_dim, job.grid[0], on_device.get(plan.name)
            )
            exact = exact_target(q, plan, job.grid)
            cosines[plan.name].append(formats.token_cosines(rebuilt, exact).flatten().cpu())
    if clips == 0:
        return {}
    return {
        name: {**formats.fidelity_summary(torch.cat(parts)), "clips": clips}
        for name, parts in cosines.items()
    }


def derive(job: Job) -> tuple[dict[str, Any], dict[str, formats.PCABasis], dict[str, int]]:
    """(derived, bases, sample sizes): fit PCA, then measure fidelity on the held-out sample."""
    cfg = job.cfg
    fit_n = cfg.pca_fit_clips if any(p.pca_dims for p in job.plans) else 0
    fid_rows, fit_rows = sample_rows(job.num_clips, cfg.fidelity_clips, fit_n, cfg.seed)
    shared = len(set(fid_rows) & set(fit_rows))
    bases = fit_bases(job, fit_rows)
    fidelity = measure_fidelity(job, fid_rows, bases)
    for entry in fidelity.values():
        entry["held_out"] = shared == 0
    pca = {
        name: {"dims": b.k, "sha256": b.sha256(), "explained_variance_ratio": b.explained_variance_ratio}
        for name, b in bases.items()
    }
    samples = {"fidelity": len(fid_rows), "pca_fit": len(fit_rows), "shared": shared}
    return {"pca": pca, "fidelity": fidelity}, bases, samples
