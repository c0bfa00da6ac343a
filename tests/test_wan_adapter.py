"""The Wan adapter on the tiny WanPipeline of the real classes: diffusers' conventions (timestep,
velocity sign, text padding), CFG dropout, LoRA and full fine-tunes that WanPipeline loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stages.common import flow
from stages.common.models.adapter import Condition
from stages.common.models.lora import LoraSpec, add_lora, load_lora, trainable_parameters
from stages.common.models.wan import LORA_WEIGHTS_NAME, WanAdapter
from stages.common.presets import tiny_wan_pipeline

TEXT_TOKENS = 8  # the tiny tests' max_sequence_length
LATENT = (16, 3, 4, 4)  # C, T', h, w: a 3 x 2 x 2 token grid


@pytest.fixture(scope="module")
def wan_folder() -> str:
    return tiny_wan_pipeline()


@pytest.fixture(scope="module")
def pipe(wan_folder: str):
    from diffusers import WanPipeline

    p = WanPipeline.from_pretrained(wan_folder)
    p.set_progress_bar_config(disable=True)
    return p


def _adapter(wan_folder: str, null_text: torch.Tensor | None = None) -> WanAdapter:
    return WanAdapter.from_pretrained(wan_folder, max_text_tokens=TEXT_TOKENS, null_text=null_text)


def _condition(b: int, n: int = 5, seed: int = 0) -> Condition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, n)
    for i in range(b):
        mask[i, : n - i] = 1
    return Condition(text_embeds=torch.randn(b, n, 32, generator=g), text_mask=mask)


def _latents(b: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, *LATENT, generator=torch.Generator().manual_seed(seed))


def test_adapter_declares_wan_objective_layout_and_text(wan_folder: str) -> None:
    a = _adapter(wan_folder)
    assert (a.family, a.objective.shift, a.objective.timestep_scale) == ("wan", 3.0, 1000.0)
    assert (a.tokens.patch_size, a.tokens.hidden_size, a.tokens.depth) == ((1, 2, 2), 32, 4)
    assert (a.conditioning.kind, a.conditioning.text_dim, a.conditioning.max_text_tokens) == ("text", 32, 8)
    x, t, cond = _latents(2), torch.tensor([0.3, 0.8]), _condition(2)
    out = a.forward(a.module, x, t, cond, align_block=2)
    assert out.velocity.shape == x.shape and out.hidden.shape == (2, 3, 4, 32)
    # block 2's hidden states do not depend on block 3; the velocity does
    with torch.no_grad():
        a.module.blocks[2].ffn.net[2].weight.mul_(3)
    again = a.forward(a.module, x, t, cond, align_block=2)
    assert torch.equal(again.hidden, out.hidden) and not torch.allclose(again.velocity, out.velocity)
    with pytest.raises(ValueError, match="align_block must be in 1..4"):
        a.forward(a.module, x, t, cond, align_block=5)
    with pytest.raises(ValueError, match="more than max_text_tokens=8"):
        a.forward(a.module, x, t, _condition(2, n=9))


def test_text_states_equal_the_pipelines_prompt_embeddings(wan_folder: str, pipe) -> None:
    """Compact embeddings + mask (what the cache stores) become exactly WanPipeline's padded prompt."""
    prompts = ["a red circle drifting left", "a square"]
    want = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS)[0]
    tok = pipe.tokenizer(prompts, padding="longest", return_tensors="pt")
    raw = pipe.text_encoder(tok.input_ids, tok.attention_mask).last_hidden_state  # un-zeroed padding
    got = _adapter(wan_folder).text_states(
        Condition(text_embeds=raw, text_mask=tok.attention_mask), torch.float32
    )
    assert raw.shape[1] < TEXT_TOKENS and not torch.equal(raw[1, -1], torch.zeros(32))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@torch.no_grad()
def test_euler_steps_equal_diffusers_flow_match_scheduler(wan_folder: str) -> None:
    """Our sampler with the adapter = FlowMatchEulerDiscreteScheduler driving Wan's transformer
    directly (timestep sigma * 1000, prediction eps - x0): unshifted, and on Wan's shifted grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    a = _adapter(wan_folder)
    cond = _condition(2)
    states = a.text_states(cond, torch.float32)
    noise = _latents(2, seed=3)

    def velocity(x, t, _y):
        return a.forward(a.module, x, t, cond).velocity

    for shift in (1.0, a.objective.shift):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        sched.set_timesteps(sigmas=[1.0, 2 / 3, 1 / 3])  # it shifts them and appends 0
        ref = noise.clone()
        for ts in sched.timesteps:
            pred = a.module(ref, ts.expand(2), encoder_hidden_states=states, return_dict=False)[0]
            ref = sched.step(pred, ts, ref, return_dict=False)[0]
        if shift == 1.0:  # our grid linspace(1, 0, 4) is the unshifted scheduler's
            ours = flow.euler_sample(velocity, noise, num_steps=3, progress=False)
        else:  # the shifted grid: a.objective.shift_time of the uniform one
            grid = a.objective.shift_time(torch.linspace(1, 0, 4))
            torch.testing.assert_close(grid[:-1], sched.sigmas[:-1], rtol=0, atol=1e-6)
            ours = noise.clone()
            for t, t_next in zip(grid[:-1], grid[1:], strict=True):
                ours = ours + (t_next - t) * velocity(ours, t.expand(2), None)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cfg_dropout_uses_the_empty_prompt(wan_folder: str, pipe) -> None:
    null = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS)[0][0]
    a = _adapter(wan_folder, null_text=null[:2])  # stored compact: padded with zeros like the pipeline
    x, t, cond = _latents(2), torch.tensor([0.5, 0.5]), _condition(2)
    cond.drop = torch.tensor([True, False])
    out = a.forward(a.module, x, t, cond).velocity
    empty = Condition(text_embeds=null[None].expand(2, -1, -1))
    ref_null = a.forward(a.module, x, t, empty).velocity
    ref_cond = a.forward(
        a.module, x, t, Condition(text_embeds=cond.text_embeds, text_mask=cond.text_mask)
    ).velocity
    torch.testing.assert_close(out[0], ref_null[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], ref_cond[1], rtol=0, atol=1e-6)
    assert not torch.allclose(out[0], ref_cond[0])
    with pytest.raises(ValueError, match="needs the empty-prompt embedding"):
        _adapter(wan_folder).forward(a.module, x, t, cond)


def _train(a: WanAdapter, params: list[torch.nn.Parameter], steps: int = 3, seed: int = 0) -> list[float]:
    """A few AdamW steps of the flow loss plus REPA's cosine at block 2 (projector to random targets)."""
    torch.manual_seed(seed)
    proj = torch.nn.Linear(a.tokens.hidden_size, 24)
    opt = torch.optim.AdamW([*params, *proj.parameters()], lr=1e-2)
    target = F.normalize(torch.randn(2, 3, 4, 24), dim=-1)
    losses = []
    for step in range(steps):
        x0, eps, t = _latents(2, seed=10 + step), _latents(2, seed=20 + step), torch.rand(2)
        out = a.forward(a.module, flow.interpolate(x0, eps, t), t, _condition(2), align_block=2)
        align = -(F.normalize(proj(out.hidden), dim=-1) * target).sum(-1).mean()
        loss = flow.flow_loss(out.velocity, flow.velocity_target(x0, eps)) + 0.5 * align
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _pipe_velocity(transformer, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return transformer(x, t * 1000, encoder_hidden_states=states, return_dict=False)[0]


def test_lora_training_saves_what_wan_pipeline_loads(wan_folder: str, tmp_path: Path) -> None:
    from diffusers import WanPipeline

    a = _adapter(wan_folder)
    base = {k: v.clone() for k, v in a.module.state_dict().items()}
    add_lora(a.module, LoraSpec(rank=4, alpha=8))  # alpha != rank: the scale must travel with the file
    params = trainable_parameters(a.module)
    assert params and all(
        ("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in a.module.named_parameters()
    )
    _train(a, params)
    for k, v in a.module.state_dict().items():  # the base weights did not move
        if "lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    a.save_pretrained(a.module, tmp_path / "lora")
    assert (tmp_path / "lora" / LORA_WEIGHTS_NAME).is_file()

    x, t, cond = _latents(2, seed=5), torch.tensor([0.2, 0.9]), _condition(2)
    states = a.text_states(cond, torch.float32)
    trained = _pipe_velocity(a.module, x, t, states)
    pipe = WanPipeline.from_pretrained(wan_folder)
    before = _pipe_velocity(pipe.transformer, x, t, states)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(_pipe_velocity(pipe.transformer, x, t, states), trained, rtol=1e-5, atol=1e-5)
    assert (before - trained).abs().max() > 1e-3  # the LoRA changed the model
    resumed = load_lora(_adapter(wan_folder).module, tmp_path / "lora")  # resume: same config, same weights
    torch.testing.assert_close(_pipe_velocity(resumed, x, t, states), trained, rtol=1e-5, atol=1e-5)


def test_lora_refuses_unknown_target_modules(wan_folder: str) -> None:
    with pytest.raises(ValueError, match=r"LoRA target modules \['to_qq'\] match no module"):
        add_lora(_adapter(wan_folder).module, LoraSpec(rank=2, targets=("to_q", "to_qq")))


def test_full_finetune_loads_as_the_pipelines_transformer_and_generates(
    wan_folder: str, tmp_path: Path
) -> None:
    import numpy as np
    from diffusers import WanPipeline, WanTransformer3DModel

    a = _adapter(wan_folder)
    losses = _train(a, list(a.module.parameters()))
    assert all(np.isfinite(losses))
    a.save_pretrained(a.module, tmp_path / "transformer")
    x, t, cond = _latents(2, seed=5), torch.tensor([0.2, 0.9]), _condition(2)
    states = a.text_states(cond, torch.float32)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "transformer")
    torch.testing.assert_close(_pipe_velocity(loaded, x, t, states), _pipe_velocity(a.module, x, t, states))
    again = WanAdapter.from_pretrained(tmp_path / "transformer", max_text_tokens=TEXT_TOKENS)
    assert again.objective.shift == 3.0  # a bare transformer folder: Wan 2.1's default shift
    pipe = WanPipeline.from_pretrained(wan_folder, transformer=loaded)
    pipe.set_progress_bar_config(disable=True)
    video = pipe(
        prompt="a red circle", num_frames=5, height=16, width=16, num_inference_steps=2,
        output_type="np", max_sequence_length=TEXT_TOKENS,
    ).frames  # fmt: skip
    assert video.shape == (1, 5, 16, 16, 3) and np.isfinite(video).all()


# ---------------------------------------------------------------------------------- the Wan VAE
def _clip(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, frames, 16, 16, 3), dtype=torch.uint8, generator=g)


def test_wan_vae_normalises_latents_as_the_pipeline_decodes(wan_folder: str, pipe) -> None:
    """`decode` of the pipeline's own output latents is the pipeline's video; `encode` is its inverse
    normalisation (per-channel latents_mean / latents_std), at 1 + (T - 1) / 4 latent frames."""
    from stages.common.models.vae import VAEWrapper

    vae = VAEWrapper.load(wan_folder, kind="wan")
    assert (vae.latent_channels, vae.spatial_factor, vae.temporal_factor, vae.scale) == (16, 8, 4, 1.0)
    assert vae.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    kw = dict(prompt="a red circle", num_frames=5, height=16, width=16, num_inference_steps=2,
              max_sequence_length=TEXT_TOKENS)  # fmt: skip
    latents = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    video = pipe(**kw, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    ours = vae.decode(latents)
    assert ours.shape == (1, 5, 16, 16, 3)
    assert (ours.float() - torch.from_numpy(video * 255).float()).abs().max() <= 1.0  # uint8 rounding

    z = vae.encode(_clip(9))
    assert z.shape == (1, 16, 3, 2, 2) and z.dtype == torch.float16
    with torch.no_grad():
        x = _clip(9).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        mu = vae.model.encode(x).latent_dist.mean  # un-normalised
    mean = torch.tensor(vae.model.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.model.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(z.float(), ((mu - mean) / std).half().float(), rtol=0, atol=0)
    assert not torch.allclose(z.float(), mu.half().float(), atol=1e-2)  # the normalisation is not a no-op


def test_wan_vae_refuses_frame_counts_it_cannot_encode(wan_folder: str) -> None:
    from stages.common.models.vae import VAEWrapper

    vae = VAEWrapper.load(wan_folder, kind="wan")
    assert [vae.latent_frames(n) for n in (1, 5, 81)] == [1, 2, 21]
    with pytest.raises(ValueError, match=r"clips need 1 \+ 4\*j frames \(e\.g\. 5, 17, 81\), got 8"):
        vae.encode(_clip(8))


# ---------------------------------------------------------------------------------- FSDP2
@pytest.mark.slow
def test_fsdp2_two_gloo_ranks_equal_one_rank(wan_folder: str, tmp_path: Path) -> None:
    """3 SGD steps of flow + alignment loss on a fixed batch of 4, full fine-tune and LoRA: two
    FSDP2 ranks (2 samples each, every block and the root sharded) give the weights of one
    unsharded process (4 samples) to 1e-6 (float32; only the reduction order differs)."""
    import subprocess
    import sys

    from helpers import subprocess_env

    worker = Path(__file__).with_name("wan_fsdp_worker.py")
    out = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
        cmd += [str(worker), wan_folder, str(tmp_path / f"ranks{n}.pt")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = torch.load(tmp_path / f"ranks{n}.pt", weights_only=True)
    one, two = out[1], out[2]
    assert one.keys() == two.keys() and len(one) > 100
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)
    base = _adapter(wan_folder).module.state_dict()
    moved = max(float((one[f"full.transformer.{k}"] - v).abs().max()) for k, v in base.items())
    lora_b = [v for k, v in one.items() if k.startswith("lora.") and "lora_B" in k]
    assert moved > 1e-3 and lora_b and all(float(v.abs().max()) > 0 for v in lora_b)  # training happened


# ---------------------------------------------------------------------------------- sizes and budget
def test_wan_sizes_match_the_released_models_and_the_cache_layout() -> None:
    from diffusers import WanTransformer3DModel

    from cache_schema import formats
    from stages.common.models.wan_sizes import WAN_SIZES, wan_bytes_per_clip, wan_config, wan_token_grid

    params = {}
    for name in WAN_SIZES:
        with torch.device("meta"):
            params[name] = sum(p.numel() for p in WanTransformer3DModel(**wan_config(name)).parameters())
        assert wan_token_grid(name, 81, 480, 832) == (21, 30, 52)
    assert 1.3e9 < params["Wan2.1-T2V-1.3B"] < 1.5e9 and 13.5e9 < params["Wan2.1-T2V-14B"] < 14.5e9
    b = wan_bytes_per_clip(
        "Wan2.1-T2V-1.3B",
        81,
        480,
        832,
        {"dino": 768, "videomae": 768},
        "int8",
        encoder_frames={"videomae": 8},
    )
    assert b["latents"] == 16 * 21 * 60 * 104 * 2 and b["text"] == 512 * 4096 * 2 + 512
    assert b["dino"] == 21 * 30 * 52 * (formats.bytes_per_token("int8", 768) + 2) == 21 * 1560 * 772
    assert b["videomae"] == 8 * 1560 * 772 and b["total"] == sum(v for k, v in b.items() if k != "total")
    with pytest.raises(ValueError, match=r"Wan clips need 1 \+ 4\*j frames \(e\.g\. 81\), got 80"):
        wan_token_grid("Wan2.1-T2V-1.3B", 80, 480, 832)


def test_gradient_checkpointing_keeps_the_aligned_hidden_states_differentiable(wan_folder: str) -> None:
    """With diffusers' gradient checkpointing the hooked block output still carries the alignment
    loss's gradient: the same gradients as without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        a = _adapter(wan_folder)
        if checkpointing:
            a.module.enable_gradient_checkpointing()
        a.module.train()
        out = a.forward(a.module, _latents(2), torch.tensor([0.3, 0.7]), _condition(2), align_block=2)
        out.hidden.pow(2).mean().backward()
        grads.append(a.module.blocks[0].attn1.to_q.weight.grad.clone())
        assert a.module.blocks[3].attn1.to_q.weight.grad is None  # past the aligned block: no gradient
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_training_process_imports_no_vae_and_no_text_encoder(wan_folder: str, tmp_path: Path) -> None:
    """What a Wan training step needs (adapter, LoRA, FSDP2 helpers, a forward, a LoRA save) loads
    neither the Wan VAE nor UMT5 nor the pipeline module that imports them."""
    import subprocess
    import sys

    from helpers import subprocess_env

    probe = (
        "import sys, json, torch\n"
        "from stages.common.models.adapter import Condition\n"
        "from stages.common.models.wan import WanAdapter\n"
        "from stages.common.models.lora import LoraSpec, add_lora\n"
        "import stages.common.models.fsdp\n"
        f"a = WanAdapter.from_pretrained({wan_folder!r}, max_text_tokens=8)\n"
        "add_lora(a.module, LoraSpec(rank=2))\n"
        "out = a.forward(a.module, torch.randn(1, 16, 1, 2, 2), torch.rand(1), "
        "Condition(text_embeds=torch.randn(1, 3, 32)), align_block=1)\n"
        f"a.save_pretrained(a.module, {str(tmp_path / 'lora')!r})\n"
        "bad = [m for m in sys.modules if m.startswith(('transformers.models.umt5', 'transformers.models.t5',\n"
        "       'diffusers.pipelines.wan', 'diffusers.models.autoencoders.autoencoder_kl_wan',\n"
        "       'stages.common.models.encoders', 'stages.extract', 'timm'))]\n"
        "print('LOADED=' + json.dumps(bad))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED=[]" in proc.stdout, proc.stdout
    assert (tmp_path / "lora" / LORA_WEIGHTS_NAME).is_file()


def test_missing_or_damaged_weights_are_named(wan_folder: str, tmp_path: Path) -> None:
    from stages.common.models.vae import WeightsNotFoundError

    with pytest.raises(
        WeightsNotFoundError, match=r"weights for model '/no/such/wan' were not found locally"
    ):
        WanAdapter.from_pretrained("/no/such/wan")
    with pytest.raises(FileNotFoundError, match=r"pytorch_lora_weights.safetensors does not exist"):
        load_lora(_adapter(wan_folder).module, tmp_path)
    a = _adapter(wan_folder)
    add_lora(a.module, LoraSpec(rank=2))
    a.save_pretrained(a.module, tmp_path / "lora")
    path = tmp_path / "lora" / LORA_WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.raises(ValueError, match=r"pytorch_lora_weights.safetensors is not a readable LoRA file"):
        load_lora(_adapter(wan_folder).module, tmp_path / "lora")


def test_factory_finds_the_wan_family(tmp_path):
    from stages.common.models.factory import family_of, load_adapter
    from stages.common.presets import tiny_wan_pipeline

    folder = Path(tiny_wan_pipeline(tmp_path)) / "transformer"
    assert family_of(folder) == "wan"
    adapter = load_adapter(folder)
    assert adapter.family == "wan" and adapter.conditioning.kind == "text"
