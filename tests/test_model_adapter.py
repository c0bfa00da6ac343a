"""The model adapter interface on the VideoDiT adapter: shapes, conditions, save/load, refusals,
and the audit that train and sample reach the model only through the interface."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import TINY_DIT, randomize_zero_inits

from stages.common.models.adapter import Condition, Conditioning, Objective, TokenLayout
from stages.common.models.factory import FAMILIES, adapter_class, build_adapter, family_of, load_adapter
from stages.common.models.videodit import VideoDiTAdapter

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
CLASSES = 3


def _adapter(seed: int = 0, **overrides) -> VideoDiTAdapter:
    torch.manual_seed(seed)
    adapter = build_adapter("videodit", **{**TINY_DIT, "num_classes": CLASSES, **overrides})
    randomize_zero_inits(adapter.module, seed, scale=0.1).eval()
    return adapter


def _inputs(adapter: VideoDiTAdapter, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *adapter.latent_shape, generator=gen)
    return x, torch.rand(batch, generator=gen)


@pytest.mark.parametrize(
    "patch,sample_size,frames,depth,hidden",
    [(1, 4, 2, 2, 32), (2, 8, 3, 2, 32), (2, 8, 1, 3, 48), (4, 8, 2, 4, 64)],
    ids=["p1", "p2", "one-frame", "p4"],
)
def test_velocity_and_hidden_shapes(patch: int, sample_size: int, frames: int, depth: int, hidden: int):
    adapter = _adapter(patch_size=patch, sample_size=sample_size, num_frames=frames, depth=depth,
                       hidden_size=hidden)  # fmt: skip
    assert adapter.family == "videodit" and adapter.objective == Objective()
    assert adapter.tokens == TokenLayout((1, patch, patch), hidden, depth)
    assert adapter.conditioning == Conditioning("class", num_classes=CLASSES, dropout=0.1)
    x, t = _inputs(adapter, batch=3)
    cond = Condition(class_labels=torch.tensor([0, 1, 2]))
    plain = adapter.forward(adapter.module, x, t, cond)
    assert plain.velocity.shape == x.shape and plain.hidden is None
    grid = adapter.tokens.grid(tuple(x.shape[2:]))
    for block in (1, depth):
        out = adapter.forward(adapter.module, x, t, cond, align_block=block)
        assert out.hidden.shape == (3, grid[0], grid[1] * grid[2], hidden)
        torch.testing.assert_close(out.velocity, plain.velocity, rtol=0, atol=0)
    assert adapter.default_align_block() == max(1, depth // 3)


def test_class_and_null_condition_through_drop():
    adapter = _adapter(1)
    module, (x, t) = adapter.module, _inputs(adapter, batch=3)
    labels = torch.tensor([0, 2, 1])
    cond = adapter.forward(module, x, t, Condition(class_labels=labels)).velocity
    dropped = adapter.forward(
        module, x, t, Condition(class_labels=labels, drop=torch.ones(3, dtype=torch.bool))
    )
    null = module(x, t, torch.full((3,), CLASSES))  # the null class id, given directly
    torch.testing.assert_close(dropped.velocity, null, rtol=0, atol=0)
    assert (cond - null).abs().max() > 1e-3  # the class changes the prediction
    # one dropped sample: only that row becomes unconditional
    mixed = adapter.forward(
        module, x, t, Condition(class_labels=labels, drop=torch.tensor([False, True, False]))
    )
    torch.testing.assert_close(mixed.velocity[[0, 2]], cond[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(mixed.velocity[1], null[1], rtol=0, atol=0)
    # guidance's doubled batch: the condition, then its null
    both = Condition(class_labels=labels).with_null()
    v = adapter.forward(module, torch.cat([x, x]), torch.cat([t, t]), both).velocity
    torch.testing.assert_close(v, torch.cat([cond, null]), rtol=0, atol=0)


def test_unconditional_model_and_condition_refusals():
    adapter = _adapter(2, num_classes=0)
    assert not adapter.conditioning.conditional
    x, t = _inputs(adapter)
    assert adapter.forward(adapter.module, x, t, Condition()).velocity.shape == x.shape
    with pytest.raises(ValueError, match="no null branch"):
        Condition().with_null()
    with pytest.raises(ValueError, match="not text embeddings"):
        adapter.forward(adapter.module, x, t, Condition(text_embeds=torch.zeros(2, 4, 8)))
    with pytest.raises(ValueError, match="conditioning kind"):
        Conditioning("image")


def _public(config) -> dict:
    """A diffusers config without its bookkeeping keys (_name_or_path, _use_default_values, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_save_and_load_round_trip(tmp_path: Path):
    adapter = _adapter(3, prediction="sample")
    adapter.save_pretrained(adapter.module, tmp_path / "m")
    assert family_of(tmp_path / "m") == "videodit"
    loaded = load_adapter(tmp_path / "m")
    assert type(loaded) is VideoDiTAdapter and _public(loaded.module.config) == _public(adapter.module.config)
    assert (loaded.conditioning, loaded.objective, loaded.tokens, loaded.latent_shape) == (
        adapter.conditioning, adapter.objective, adapter.tokens, adapter.latent_shape
    )  # fmt: skip
    for (name, a), (_, b) in zip(
        adapter.module.state_dict().items(), loaded.module.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    x, t = _inputs(adapter)
    cond = Condition(class_labels=torch.tensor([1, 0]))
    loaded.module.eval()
    out_a = adapter.forward(adapter.module, x, t, cond, align_block=1)
    out_b = loaded.forward(loaded.module, x, t, cond, align_block=1)
    torch.testing.assert_close(out_b.velocity, out_a.velocity, rtol=0, atol=0)
    torch.testing.assert_close(out_b.hidden, out_a.hidden, rtol=0, atol=0)


def test_token_grid_refusal():
    layout = TokenLayout((1, 2, 2), 32, 2)
    assert layout.grid((3, 8, 6)) == (3, 4, 3)
    with pytest.raises(ValueError, match="latent width 7 is not divisible by the patch size 2"):
        layout.grid((3, 8, 7))
    adapter = _adapter()
    with pytest.raises(ValueError, match="not divisible by patch size 2"):
        adapter.forward(adapter.module, torch.randn(1, 4, 3, 8, 7), torch.rand(1), Condition())


def test_factory_refusals(tmp_path: Path):
    with pytest.raises(ValueError, match=r"unknown model family 'dalle'; known: videodit, wan"):
        build_adapter("dalle")
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match=r"config.json names the model class 'UNet2DModel'"):
        load_adapter(folder)
    with pytest.raises(TypeError, match="wraps a VideoDiT"):
        VideoDiTAdapter(torch.nn.Linear(2, 2))
    assert Objective(shift=3.0).shift_time(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0.0, 0.75, 1.0]


# ----------------------------------------------------------------------------- import audit

# what must reach a model only through stages/common/models (adapter.py, factory.py)
INTERFACE_ONLY = [
    *sorted((ROOT / "stages" / "train").glob("*.py")),
    *sorted((ROOT / "stages" / "sample").glob("*.py")),
    ROOT / "stages" / "common" / "sampling.py",
    ROOT / "stages" / "common" / "flow.py",
    *sorted((ROOT / "bench").glob("*.py")),
]
FAMILY_MODULES = re.compile(r"\bVideoDiT\b|models\.(dit|dit_sizes|videodit)\b|models import (dit|videodit)")


@pytest.mark.parametrize("path", INTERFACE_ONLY, ids=lambda p: str(p.relative_to(ROOT)))
def test_train_sample_and_bench_never_name_a_model_family(path: Path):
    hits = [
        f"{path.name}:{i}: {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines(), start=1)
        if FAMILY_MODULES.search(line)
    ]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_resolves_to_its_adapter(family: str):
    assert adapter_class(family).family == family
