"""VideoDiT: shapes, save/load round trip, hidden states, class conditioning, adaLN-Zero init."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_zero_inits, tiny_dit

from stages.common.models.dit import VideoDiT, default_align_depth, sincos_2d
from stages.common.models.dit_sizes import build_video_dit
from stages.common.registry import MODEL_SIZES

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "hidden,depth,heads,frames,size,channels",
    [(32, 2, 2, 2, 4, 4), (48, 3, 3, 4, 8, 4), (64, 4, 4, 1, 6, 3), (32, 1, 1, 5, 4, 16)],
)
def test_velocity_shape(hidden, depth, heads, frames, size, channels):
    model = tiny_dit(
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_frames=frames,
        sample_size=size,
        in_channels=channels,
    )
    x = torch.randn(2, channels, frames, size, size)
    v = model(x, torch.rand(2))
    assert v.shape == x.shape
    assert len(model.blocks) == depth
    # blocks alternate spatial / temporal attention
    assert [b.temporal for b in model.blocks] == [bool(i % 2) for i in range(depth)]


@pytest.mark.parametrize("name", list(MODEL_SIZES))
def test_named_sizes_config(name):
    hidden, depth, heads = MODEL_SIZES[name]
    if name == "tiny":
        model = build_video_dit(name, num_frames=2, sample_size=4)
        assert model(torch.randn(1, 4, 2, 4, 4), torch.rand(1)).shape == (1, 4, 2, 4, 4)
    else:  # building the big ones costs seconds of RAM and init; check the config mapping only
        with torch.device("meta"):
            model = build_video_dit(name, num_frames=2, sample_size=8 if name == "mini/4" else 4)
    assert (model.config.hidden_size, model.config.depth, model.config.num_heads) == (hidden, depth, heads)
    assert model.config.patch_size == (int(name.split("/")[1]) if "/" in name else 2)


@pytest.mark.parametrize("name,millions", [("S/2", 33.0), ("B/2", 130.5), ("L/2", 458.0), ("XL/2", 675.1)])
def test_sizes_match_dits_published_parameter_counts(name, millions):
    """DiT (Peebles & Xie 2023, Table 1) at 256 px, 1000 classes: a Latte block has a DiT block's weights."""
    with torch.device("meta"):
        model = build_video_dit(name, num_frames=16, sample_size=32, num_classes=1000)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=0.01)
    with pytest.raises(ValueError, match="unknown VideoDiT size"):
        build_video_dit("XXL/2")


def test_default_align_depth():
    assert default_align_depth(28) == 8
    assert default_align_depth(24) == 8
    assert default_align_depth(12) == 4
    assert default_align_depth(4) == 1
    assert default_align_depth(2) == 1


def test_zero_init_output_is_zero():
    model = tiny_dit(num_classes=3)
    v = model(torch.randn(2, 4, 3, 8, 8), torch.rand(2), torch.tensor([0, 2]))
    assert torch.count_nonzero(v) == 0
    # but the trunk is not degenerate: hidden states carry the input
    _, h = model(torch.randn(2, 4, 3, 8, 8), torch.rand(2), torch.tensor([0, 2]), return_hidden_at=1)
    assert h.abs().sum() > 0


def test_return_hidden_at_shape_and_position():
    model = tiny_dit(depth=3, num_frames=4, sample_size=8)
    randomize_zero_inits(model)
    x, t = torch.randn(2, 4, 4, 8, 8), torch.rand(2)
    v0 = model(x, t)
    hs = []
    for k in (1, 2, 3):
        v, h = model(x, t, return_hidden_at=k)
        assert h.shape == (2, 4, 16, 32)  # [B, T, H*W, D] with (H, W) = (8/2, 8/2)
        torch.testing.assert_close(v, v0)
        hs.append(h)
    assert not torch.allclose(hs[0], hs[1])
    with pytest.raises(ValueError, match="return_hidden_at"):
        model(x, t, return_hidden_at=4)


def test_temporal_mixing_only_through_temporal_blocks():
    """A one-block (spatial only) model never mixes frames; adding a temporal block does."""
    x, t = torch.randn(1, 4, 3, 8, 8), torch.rand(1)
    for depth, mixes in ((1, False), (2, True)):
        model = tiny_dit(depth=depth)
        randomize_zero_inits(model)
        x2 = x.clone()
        x2[:, :, 0] += 1.0  # perturb frame 0 only
        diff = (model(x2, t) - model(x, t)).abs().amax(dim=(0, 1, 3, 4))
        assert diff[0] > 0
        assert bool((diff[1:] > 1e-6).any()) == mixes


def test_save_load_round_trip(tmp_path):
    model = tiny_dit(num_classes=5)
    randomize_zero_inits(model, seed=3)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    loaded = VideoDiT.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.num_classes == 5
    x, t, y = torch.randn(2, 4, 3, 8, 8), torch.rand(2), torch.tensor([1, 4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
    torch.testing.assert_close(loaded.spatial_pos, sincos_2d(32, 4, 4))


def test_class_conditioning_and_null_class():
    model = tiny_dit(num_classes=3)
    randomize_zero_inits(model)
    model.eval()
    x, t = torch.randn(2, 4, 3, 8, 8), torch.rand(2)
    y = torch.tensor([0, 1])
    v_c = model(x, t, y)
    v_null = model(x, t, torch.tensor([3, 3]))
    assert not torch.allclose(v_c, v_null)
    torch.testing.assert_close(model(x, t, y, force_drop_ids=torch.tensor([1, 1])), v_null)
    # drop only the second sample
    v_mix = model(x, t, y, force_drop_ids=torch.tensor([0, 1]))
    torch.testing.assert_close(v_mix[0], v_c[0])
    torch.testing.assert_close(v_mix[1], v_null[1])
    # y=None means the null class
    torch.testing.assert_close(model(x, t, None), v_null)
    with pytest.raises(ValueError, match="class labels"):
        model(x, t, torch.tensor([0, 4]))


def test_class_dropout_in_training_mode():
    model = tiny_dit(num_classes=3, class_dropout=1.0)
    randomize_zero_inits(model)
    x, t, y = torch.randn(2, 4, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    model.train()
    v_train = model(x, t, y)
    model.eval()
    torch.testing.assert_close(v_train, model(x, t, torch.tensor([3, 3])))


def test_unconditional_rejects_labels():
    model = tiny_dit()
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 4, 3, 8, 8), torch.rand(1), torch.tensor([0]))


def test_bad_input_errors():
    model = tiny_dit()
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(1, 3, 3, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 3, 7, 8), torch.rand(1))
    with pytest.raises(ValueError, match="divisible"):
        tiny_dit(num_heads=5)


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    a = tiny_dit()
    randomize_zero_inits(a)
    b = tiny_dit()
    b.load_state_dict(a.state_dict())
    b.enable_gradient_checkpointing()
    x, t = torch.randn(2, 4, 3, 8, 8), torch.rand(2)
    a(x, t).square().sum().backward()
    b(x, t).square().sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
    assert build_video_dit(
        "tiny", num_frames=2, sample_size=4, gradient_checkpointing=True
    ).gradient_checkpointing


@pytest.mark.gpu
def test_bf16_autocast_on_cuda_matches_fp32():
    model = tiny_dit(num_classes=3)
    randomize_zero_inits(model)
    model = model.cuda().eval()
    x, t, y = (
        torch.randn(2, 4, 3, 8, 8, device="cuda"),
        torch.rand(2, device="cuda"),
        torch.tensor([0, 1], device="cuda"),
    )
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, y, return_hidden_at=1)[0].float()
    assert (out - ref).norm() / ref.norm() < 0.05


def test_sample_prediction_returns_jit_velocity():
    """prediction="sample": the network's output is x0_hat and forward returns (x_t - x0_hat) / max(t, t_eps),
    checked against the same weights read as a velocity model (JiT's conversion, our t = noise level)."""
    torch.manual_seed(0)
    kwargs = dict(hidden_size=32, depth=2, num_heads=2, num_frames=2, sample_size=4, in_channels=12)
    as_sample = tiny_dit(prediction="sample", **kwargs)
    randomize_zero_inits(as_sample)
    as_velocity = tiny_dit(**kwargs)
    as_velocity.load_state_dict(as_sample.state_dict())
    x = torch.randn(3, 12, 2, 4, 4)
    t = torch.tensor([0.5, 0.9, 0.01])
    raw = as_velocity(x, t)  # the same network output, read unconverted
    expected = (x - raw) / t.clamp_min(0.05).reshape(3, 1, 1, 1, 1)
    torch.testing.assert_close(as_sample(x, t), expected)
    assert as_sample.config.prediction == "sample"
    with pytest.raises(ValueError, match="prediction"):
        tiny_dit(prediction="epsilon", **kwargs)


def test_predictions_of_the_standalone_model_module_match_the_registry():
    """dit.py imports nothing of the package (`pipeline export` ships it), so it writes the tuple too."""
    from stages.common import registry
    from stages.common.models import dit

    assert dit.PREDICTIONS == registry.PREDICTIONS
