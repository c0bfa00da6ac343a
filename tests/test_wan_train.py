"""`train --base`: the shared state and step fine-tune the tiny WanPipeline of the real classes
(LoRA and full), checkpoints load in diffusers' WanPipeline, a resume equals an uninterrupted run,
CFG dropout gives the stored empty prompt, and `pipeline sample --prompt` generates from a run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import subprocess_env

from cache_schema import RunDir
from cache_schema.layout import CacheLayout, TextEntry
from cache_schema.run import LORA_WEIGHTS_FILE
from stages.common.presets import tiny_wan_pipeline
from stages.train.config import TrainConfig
from stages.train.state import TrainState, build_state, load_state, save_state
from stages.train.step import StepConfig, train_step

LATENT = [16, 2, 4, 4]  # 5 frames of 32 x 32 through the Wan VAE: a 2 x 2 x 2 token grid
GRID = [2, 2, 2]
TEXT_LEN, TEXT_DIM = 8, 32
LAYOUT = CacheLayout(fingerprint="f", spec={}, derived={}, grid=tuple(GRID), latent_shape=tuple(LATENT),
                     encoders=(), text=TextEntry("tiny-wan", TEXT_LEN, TEXT_DIM))  # fmt: skip
ENC = {"enc": 8}
LAMBDAS = {"enc": 0.5}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def wan_folder() -> str:
    return tiny_wan_pipeline()


def _null() -> torch.Tensor:
    """A stand-in for the shards' empty prompt: nonzero in its first two tokens, zero after."""
    null = torch.zeros(TEXT_LEN, TEXT_DIM)
    null[:2] = torch.randn(2, TEXT_DIM, generator=torch.Generator().manual_seed(9))
    return null


def _cfg(wan_folder: str, **kw) -> TrainConfig:
    base = dict(shards="s", out="o", base=wan_folder, lora_rank=4, projector_dim=16, lr=1e-2, ema=0.5)
    cfg = TrainConfig(**{**base, **kw})
    cfg.validate()
    return cfg


def _state(cfg: TrainConfig) -> TrainState:
    return build_state(cfg, LAYOUT, ENC, LAMBDAS, CPU, null_text=_null())


def _batch(i: int, b: int = 2) -> dict:
    """A prepared batch (what step.prepare_batch gives): latents, targets, prompt embeddings + mask."""
    g = torch.Generator().manual_seed(100 + i)
    mask = torch.zeros(b, TEXT_LEN, dtype=torch.bool)
    mask[:, :5] = True
    embeds = torch.randn(b, TEXT_LEN, TEXT_DIM, generator=g) * mask[..., None]
    return {"x0": torch.randn(b, *LATENT, generator=g), "label": torch.full((b,), -1),
            "targets": {"enc": torch.randn(b, *GRID, 8, generator=g)},
            "text_embeds": embeds, "text_mask": mask}  # fmt: skip


STEP = StepConfig(device=CPU, encoders={}, frames=GRID[0])


def _train(state: TrainState, steps: range) -> list[float]:
    return [train_step(state, [_batch(i)], STEP, LAMBDAS, measure=True).loss for i in steps]


def _lora_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_" in k}


# ---------------------------------------------------------------------------------- config
def test_base_needs_exactly_one_of_lora_rank_and_full_finetune(wan_folder: str) -> None:
    for kw, match in [
        (dict(lora_rank=None), "needs --lora-rank R"),
        (dict(full_finetune=True), "not both"),
        (dict(base=None), "pass --base PIPELINE"),
        (dict(lora_rank=0), "lora_rank must be >= 1"),
        (dict(eval_every=5), "sample GIFs"),
    ]:
        with pytest.raises(ValueError, match=match):
            _cfg(wan_folder, **kw)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--shards", "s", "--out", "o", "--base", wan_folder],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Error:" in proc.stderr and "Traceback" not in proc.stderr
    assert f"base: --base {wan_folder} needs --lora-rank R (LoRA, e.g. 32) or --full-finetune" in proc.stderr


def test_shards_the_base_cannot_take_are_refused_naming_the_field(wan_folder: str) -> None:
    cfg = _cfg(wan_folder)
    cases = [
        (
            {"latent_shape": [4, 2, 4, 4]},
            r"latent_shape \[4, 2, 4, 4\] has 4 channels but --base .* takes 16",
        ),
        ({"grid": (2, 4, 4)}, r"grid \[2, 4, 4\] is not --base .*'s token grid \[2, 2, 2\]"),
        ({"latent_shape": (16, 2, 5, 4)}, r"latent_shape \[16, 2, 5, 4\]: latent height 5 is not divisible"),
        ({"text": None}, r"hold no prompt embeddings \(no `text` field"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            build_state(cfg, replace(LAYOUT, **change), ENC, LAMBDAS, CPU)


# ---------------------------------------------------------------------------------- LoRA
def test_lora_trains_only_lora_and_its_checkpoint_loads_in_wanpipeline(
    wan_folder: str, tmp_path: Path
) -> None:
    from diffusers import WanPipeline

    state = _state(_cfg(wan_folder))
    base = {k: v.clone() for k, v in state.model.state_dict().items() if "lora_" not in k}
    trainable = {id(p) for p in state.parameters()}
    lora = [p for n, p in state.model.named_parameters() if "lora_" in n]
    assert lora and all(id(p) in trainable for p in lora)
    assert not any(id(p) in trainable for n, p in state.model.named_parameters() if "lora_" not in n)
    frozen = [p for n, p in state.model.named_parameters() if "lora_" not in n]
    assert all(any(e is p for e in state.ema.parameters()) for p in frozen[:3])  # the EMA shares the base
    _train(state, range(3))
    after = state.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the base did not move
    assert any(float(v.abs().max()) > 0 for k, v in after.items() if "lora_B" in k)  # LoRA did

    save_state(tmp_path, state, {"rng": {}})
    assert (tmp_path / LORA_WEIGHTS_FILE).is_file() and (tmp_path / "model" / LORA_WEIGHTS_FILE).is_file()
    pipe = WanPipeline.from_pretrained(wan_folder)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", num_frames=5, height=16, width=16, num_inference_steps=2,
              max_sequence_length=TEXT_LEN, output_type="latent")  # fmt: skip
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    pipe.load_lora_weights(str(tmp_path))  # the step folder itself: the EMA's LoRA
    tuned = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    assert torch.isfinite(tuned).all() and not torch.allclose(plain, tuned)

    def named(sd: dict) -> dict:  # without the adapter's name ("default" here, "default_0" in the pipeline)
        return {
            k.replace(".default_0.", ".").replace(".default.", "."): v for k, v in sd.items() if "lora_B" in k
        }

    loaded, ema = named(pipe.transformer.state_dict()), named(state.ema.state_dict())
    assert len(loaded) == len(ema) and all(torch.equal(loaded[k], ema[k]) for k in ema)  # same names, values


def test_full_finetune_saves_a_transformer_wanpipeline_loads(wan_folder: str, tmp_path: Path) -> None:
    from diffusers import WanPipeline, WanTransformer3DModel

    state = _state(_cfg(wan_folder, lora_rank=None, full_finetune=True))
    n = sum(p.numel() for p in state.model.parameters())
    assert sum(p.numel() for p in state.optimizer.param_groups[0]["params"]) == n
    before = copy.deepcopy(state.model.state_dict())
    _train(state, range(2))
    assert any(not torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    save_state(tmp_path, state, {"rng": {}})
    assert (tmp_path / "ema" / "config.json").is_file() and not (tmp_path / LORA_WEIGHTS_FILE).exists()
    transformer = WanTransformer3DModel.from_pretrained(tmp_path / "ema")
    pipe = WanPipeline.from_pretrained(wan_folder, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    video = pipe(prompt="a square", num_frames=5, height=16, width=16, num_inference_steps=2,
                 max_sequence_length=TEXT_LEN, output_type="np").frames  # fmt: skip
    assert video.shape == (1, 5, 16, 16, 3)


# ---------------------------------------------------------------------------------- resume, dropout
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(
    wan_folder: str, tmp_path: Path, mode: str
) -> None:
    kw = (
        dict(class_dropout=0.5)
        if mode == "lora"
        else dict(lora_rank=None, full_finetune=True, class_dropout=0.5)
    )
    cfg = _cfg(wan_folder, **kw)
    straight = _state(cfg)
    want = _train(straight, range(4))
    first = _state(cfg)
    _train(first, range(2))
    save_state(tmp_path, first, {"gen": first.gen.get_state()})
    resumed = _state(cfg)  # a fresh process's state: base weights, new LoRA init
    saved = load_state(tmp_path, resumed)
    resumed.gen.set_state(saved["gen"])
    got = _train(resumed, range(2, 4))
    assert got == want[2:]
    for a, b in ((straight.model, resumed.model), (straight.ema, resumed.ema)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_damaged_lora_checkpoint_is_named(wan_folder: str, tmp_path: Path) -> None:
    from cache_schema.checkpoint import CheckpointError

    state = _state(_cfg(wan_folder))
    save_state(tmp_path, state, {})
    path = tmp_path / "model" / LORA_WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=f"{path} is damaged and cannot be read"):
        load_state(tmp_path, _state(_cfg(wan_folder)))


def test_cfg_dropout_gives_the_stored_empty_prompt(wan_folder: str) -> None:
    """Every caption dropped (class_dropout 1) trains exactly as captions that are the empty prompt
    (no dropout): same loss, same LoRA update; and not as the captions themselves."""
    dropped = _state(_cfg(wan_folder, class_dropout=1.0 - 1e-9))
    as_null = _state(_cfg(wan_folder, class_dropout=0.0))
    kept = _state(_cfg(wan_folder, class_dropout=0.0))
    batch = _batch(0)
    null_batch = {**batch, "text_embeds": _null()[None].expand(2, -1, -1).clone(),
                  "text_mask": torch.ones(2, TEXT_LEN, dtype=torch.bool)}  # fmt: skip
    losses = [
        train_step(s, [b], STEP, LAMBDAS).loss
        for s, b in ((dropped, batch), (as_null, null_batch), (kept, batch))
    ]
    assert losses[0] == losses[1] != losses[2]
    a, b = _lora_tensors(dropped.model), _lora_tensors(as_null.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_model_without_prompts_in_the_batch_is_refused(wan_folder: str) -> None:
    state = _state(_cfg(wan_folder))
    batch = {k: v for k, v in _batch(0).items() if not k.startswith("text")}
    with pytest.raises(
        ValueError, match="carry no prompt embeddings; extract a captioned manifest with --base"
    ):
        train_step(state, [batch], STEP, LAMBDAS)


def test_training_a_lora_imports_no_text_encoder_vae_or_encoder(wan_folder: str, tmp_path: Path) -> None:
    """Build, train and checkpoint a LoRA state in a fresh process: no text encoder, VAE or
    encoder module is imported (the latents and the prompts come from the cache). Our vae.py
    wrapper module is allowed (its hub helpers resolve --base); diffusers' VAE classes are not."""
    probe = f"""
import sys, json, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_wan_train as t
state = t._state(t._cfg({wan_folder!r}))
t._train(state, range(1))
t.save_state(__import__('pathlib').Path({str(tmp_path)!r}), state, {{}})
enc = tuple('transformers.models.' + n for n in ('dinov2', 'sam2', 'videomae', 'umt5', 't5'))
bad = [m for m in sys.modules if m == 'timm' or m.startswith(('timm.', *enc, 'diffusers.models.autoencoders',
       'diffusers.pipelines.wan', 'stages.common.models.encoders', 'stages.extract'))]
print('BAD=' + json.dumps(bad))
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=subprocess_env(),
                          timeout=180, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("BAD="))
    assert json.loads(line[4:]) == []


# ---------------------------------------------------------------------------------- sampling
def test_shifted_time_grid_and_videodit_grid_unchanged() -> None:
    from stages.common.flow import time_grid

    plain = time_grid("euler", 4)
    assert plain == torch.linspace(1.0, 0.0, 5, dtype=torch.float64).tolist()
    assert time_grid("euler", 4, shift=1.0) == plain
    shifted = time_grid("euler", 4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert shifted[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))


# ---------------------------------------------------------------------------------- the CLI, end to end
CAPTION_LEN = 16  # tokens per cached prompt here (Wan's 512 costs time, not coverage)


@pytest.fixture(scope="module")
def wan_shards(wan_folder: str, synth_videos: Path, tmp_path_factory) -> Path:
    """Captioned synthetic clips -> extract --base (Wan VAE latents, UMT5 prompts, dino targets on
    Wan's 2 x 2 x 2 token grid) -> pack: the real writers."""
    import csv

    from helpers import tiny_extract_config

    from stages.extract import runner
    from stages.pack.packer import PackConfig, run_pack

    root = tmp_path_factory.mktemp("wan-cache")
    videos = sorted(synth_videos.rglob("*.mp4"))
    manifest = root / "captions.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "caption"])
        writer.writerows((str(v), v.parent.name, f"a {v.parent.name.split('_', 2)[-1]} shape, clip {i}")
                         for i, v in enumerate(videos))  # fmt: skip
    cfg = tiny_extract_config(manifest, root / "store", encoders=["dino"], clips_per_video=1, fidelity_clips=1,
                              num_workers=0, base=wan_folder, text_max_length=CAPTION_LEN, vae=wan_folder,
                              vae_kind="wan", frames=5, size=32, patch_size=2)  # fmt: skip
    runner.run_extract(cfg)
    run_pack(
        PackConfig(cache=str(root / "store"), out=str(root / "shards"), samples_per_shard=4, progress=False)
    )
    return root / "shards"


def _train_cli(
    shards: Path, run: Path, wan: str, *extra: str, probe: bool = False
) -> subprocess.CompletedProcess:
    """`pipeline train --base` in a fresh process; with `probe`, it prints the encoder, VAE and
    text-encoder modules the process imported."""
    audit = (
        "import sys, json\n"
        "sys.argv = ['pipeline'] + sys.argv[1:]\n"
        "from pipeline.cli import main\n"
        "try:\n"
        "    main(standalone_mode=False)\n"
        "finally:\n"
        "    enc = tuple('transformers.models.' + n for n in ('dinov2', 'sam2', 'videomae', 'umt5', 't5'))\n"
        "    bad = [m for m in sys.modules if m == 'timm' or m.startswith(('timm.', *enc, 'diffusers.models.autoencoders',\n"
        "           'diffusers.pipelines.wan', 'stages.common.models.encoders', 'stages.common.models.text',\n"
        "           'stages.extract'))]\n"
        "    print('IMPORTED=' + json.dumps(bad))\n"
    )
    head = [sys.executable, "-c", audit] if probe else [sys.executable, "-m", "pipeline.cli"]
    cmd = [*head, "train", "--shards", str(shards), "--out", str(run), "--base", wan, "--batch-size", "2",
           "--checkpoint-every", "2", "--log-every", "1", "--num-workers", "0", "--device", "cpu",
           "--projector-dim", "16", "--lr", "1e-2", "--ema", "0.5", "--set", "shuffle_buffer=4",
           "--set", "class_dropout=0.5", *extra]  # fmt: skip
    return subprocess.run(
        cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=run.parent
    )


def _lora_file(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / LORA_WEIGHTS_FILE)


def test_cli_lora_run_resumes_exactly_imports_no_encoder_and_loads_in_wanpipeline(
    wan_folder: str, wan_shards: Path, tmp_path: Path
) -> None:
    from diffusers import WanPipeline

    straight = _train_cli(wan_shards, tmp_path / "straight", wan_folder, "--lora-rank", "4", "--steps", "4",
                          probe=True)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    line = next(x for x in straight.stdout.splitlines() if x.startswith("IMPORTED="))
    assert json.loads(line.split("=", 1)[1]) == []  # latents and prompts come from the cache
    half = _train_cli(wan_shards, tmp_path / "resumed", wan_folder, "--lora-rank", "4", "--steps", "2")
    assert half.returncode == 0, half.stderr[-3000:]
    again = _train_cli(
        wan_shards, tmp_path / "resumed", wan_folder, "--lora-rank", "4", "--steps", "4", "--resume"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = RunDir(tmp_path / "straight"), RunDir(tmp_path / "resumed")
    assert [r["loss"] for r in a.read_log()] == [r["loss"] for r in b.read_log()]
    ckpt_a, ckpt_b = a.latest_checkpoint(), b.latest_checkpoint()
    for sub in ("model", "ema"):
        wa, wb = _lora_file(ckpt_a / sub), _lora_file(ckpt_b / sub)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(float(v.abs().max()) > 0 for k, v in _lora_file(ckpt_a / "model").items() if "lora_B" in k)

    pipe = WanPipeline.from_pretrained(wan_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(ckpt_a))  # the step folder: diffusers' LoRA file of the EMA weights
    video = pipe(prompt="a drift right shape", num_frames=5, height=32, width=32, num_inference_steps=2,
                 max_sequence_length=CAPTION_LEN, output_type="np").frames  # fmt: skip
    assert video.shape == (1, 5, 32, 32, 3) and np.isfinite(video).all()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a drift right shape\n\na drift left shape\n")
    cmd = [sys.executable, "-m", "pipeline.cli", "sample", "--run", str(a.path), "--prompts", str(prompts),
           "--num", "3", "--steps", "2", "--cfg", "3", "--device", "cpu", "--out", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["prompts"] == ["a drift right shape", "a drift left shape", "a drift right shape"]
    videos = np.load(tmp_path / "out" / "videos.npz")["videos"]
    assert summary["decoded"] and videos.shape == (3, 5, 32, 32, 3)
    bad = subprocess.run([*cmd[:-2], "--out", str(tmp_path / "o2"), "--prompt", "x"], capture_output=True,
                         text=True, env=subprocess_env(), timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "prompt: pass --prompt TEXT or --prompts FILE, not both" in bad.stderr
    none = subprocess.run([*cmd[:6], "--num", "1", "--steps", "1", "--out", str(tmp_path / "o3")],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)  # fmt: skip
    assert none.returncode == 2 and "text-to-video model; pass --prompt TEXT or --prompts FILE" in none.stderr


def test_cli_full_finetune_saves_the_transformer(wan_folder: str, wan_shards: Path, tmp_path: Path) -> None:
    from diffusers import WanTransformer3DModel

    proc = _train_cli(wan_shards, tmp_path / "run", wan_folder, "--full-finetune", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = RunDir(tmp_path / "run").latest_checkpoint()
    model = WanTransformer3DModel.from_pretrained(ckpt / "model")
    base = WanTransformer3DModel.from_pretrained(wan_folder, subfolder="transformer").state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert not (ckpt / LORA_WEIGHTS_FILE).exists()


def test_a_resume_cannot_change_the_fine_tune(wan_folder: str) -> None:
    from stages.train.config import resume_changes

    run = {"base": wan_folder, "lora_rank": 4, "lora_alpha": None, "lora_targets": [], "full_finetune": False}
    assert resume_changes(run, _cfg(wan_folder)) == []
    assert resume_changes(run, _cfg(wan_folder, lora_rank=8)) == ["lora_rank (run: 4, now: 8)"]
    assert resume_changes(run, _cfg(wan_folder, lora_targets=["to_q"])) == [
        "lora_targets (run: [], now: ['to_q'])"
    ]


def test_extract_with_base_uses_its_vae_unless_one_is_named(
    wan_folder: str, synth_videos: Path, tmp_path: Path
) -> None:
    """`extract --base` alone encodes with the base's own VAE (16 Wan latent channels, 1 + 4j frames);
    a --vae-kind given by the user is kept (and here refused for this clip length by the image VAE)."""
    import csv

    from click.testing import CliRunner

    from pipeline.cli import main as cli_main

    manifest = tmp_path / "captions.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "caption"])
        writer.writerows((str(v), "", "a shape drifting") for v in sorted(synth_videos.rglob("*.mp4"))[:2])
    args = ["extract", "--data", str(manifest), "--base", wan_folder, "--frames", "5", "--size", "32",
            "--patch-size", "2", "--encoders", "hog", "--out", str(tmp_path / "store"), "--dry-run",
            "--preset", "tiny"]  # fmt: skip
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 0, result.output
    assert f"--base: latents with its own VAE (--vae {wan_folder} --vae-kind wan)" in result.output
    assert "latent: (16, 2, 4, 4)" in result.output  # Wan's VAE: 16 channels, 1 + (5 - 1) / 4 frames
    named = CliRunner().invoke(cli_main, [*args, "--vae-kind", "image"])
    assert "--base: latents with its own VAE" not in named.output
