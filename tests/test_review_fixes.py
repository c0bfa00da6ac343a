"""What a review found: the conv projector's kernel as a setting, the loader's skip log as explicit
state, no schema-v1 "fusion" setting, one definition of each help default, preset table and format
rule."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make_shards
from helpers import tiny_train_config as tiny
from safetensors.torch import load_file

from cache_schema import RunDir, read_shard_layout
from pipeline.cli import main as cli_main
from stages.train import train
from stages.train.data import DecodeSamples, ReadShards, SkipLog

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=16, per_shard=8)


# --------------------------------------------------------------------------- --projector-kernel


def test_projector_kernel_sets_the_conv_and_is_fixed_on_resume(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(
        tiny(shards, run, steps=1, checkpoint_every=1, projector="conv", projector_kernel=1), progress=False
    )
    weights = load_file(RunDir(run).latest_checkpoint() / "projectors.safetensors")
    assert weights["projectors.dino.conv.weight"].shape[-2:] == (1, 1)  # iREPA's LDM default
    with pytest.raises(ValueError, match=r"cannot change projector_kernel \(run: 1, now: 3\)"):
        train(tiny(shards, run, steps=2, projector="conv", projector_kernel=3, resume=True), progress=False)
    other = tmp_path / "default"
    train(tiny(shards, other, steps=1, checkpoint_every=1, projector="conv"), progress=False)
    weights = load_file(RunDir(other).latest_checkpoint() / "projectors.safetensors")
    assert weights["projectors.dino.conv.weight"].shape[-2:] == (3, 3)  # iREPA's README and JiT default


@pytest.mark.parametrize("kernel", ["2", "0"])
def test_an_even_or_zero_kernel_is_refused_before_anything_runs(shards: Path, tmp_path: Path, kernel) -> None:
    args = ["train", "--shards", str(shards), "--out", str(tmp_path / "run"), "--preset", "tiny"]
    res = CliRunner().invoke(cli_main, [*args, "--projector", "conv", "--projector-kernel", kernel])
    assert res.exit_code == 2, res.output
    assert f"projector_kernel must be odd and >= 1 (it keeps the token grid), got {kernel}" in res.output
    assert not (tmp_path / "run").exists()
    help_text = CliRunner().invoke(cli_main, ["train", "--help"]).output
    assert "--projector-kernel" in help_text and "[3]" in " ".join(help_text.split())


# --------------------------------------------------------------------------- the loader's skip log


def _truncated_copy(src: Path, dst: Path) -> str:
    dst.write_bytes(src.read_bytes()[:1000])  # cut inside the first member
    return str(dst)


def test_two_streams_never_report_each_others_skips(shards: Path, tmp_path: Path) -> None:
    """A stream whose last shard is unreadable keeps that message to itself: another stream in the
    same process (the next segment, the latents-only twin) does not report it as its own."""
    index = read_shard_layout(shards)
    encoders = index.encoder_entries()
    good = str(shards / index.shards[0].name)
    bad = _truncated_copy(shards / index.shards[1].name, tmp_path / "cut.tar")
    with pytest.raises(tarfile.ReadError):
        tarfile.open(bad).getmembers()  # the bad case is real: the tar is cut

    def stream(urls: list[str]):
        skips = SkipLog()
        shards_in = ({"url": u} for u in urls)
        return skips, DecodeSamples(encoders, "skip", skips)(ReadShards("skip", skips)(shards_in))

    skips_a, a = stream([good, bad])
    assert len(list(a)) == 8  # the good shard's samples; the cut shard is dropped at the end
    assert len(skips_a.pending) == 1 and "cut.tar is unreadable" in skips_a.pending[0]
    _, b = stream([good])
    assert all(sample["skipped"] == [] for sample in b)
    # within one stream the message rides along with the next good sample
    skips_c, c = stream([bad, good])
    samples = list(c)
    assert "cut.tar is unreadable" in samples[0]["skipped"][0] and skips_c.pending == []


# --------------------------------------------------------------------------- no "fusion" setting


def test_the_v1_fusion_setting_is_gone(tmp_path: Path) -> None:
    from stages.extract.config import ExtractConfig

    assert "fusion" not in ExtractConfig.__dataclass_fields__
    res = CliRunner().invoke(
        cli_main, ["extract", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "fusion=concat"]
    )
    assert res.exit_code == 2 and "fusion" in res.output, res.output
    for command in ("extract", "pack", "train"):
        assert "fused" not in CliRunner().invoke(cli_main, [command, "--help"]).output
    assert "fused" not in CliRunner().invoke(cli_main, ["--help"]).output


# --------------------------------------------------------------------------- one definition each


def test_help_defaults_come_from_the_config(tmp_path: Path) -> None:
    from pipeline.commands.common import help_default
    from stages.pack.packer import PackConfig
    from stages.train.config import TrainConfig

    assert help_default(PackConfig, "samples_per_shard") == "256"
    assert help_default(TrainConfig, "align_until", none="never") == "never"
    assert help_default(TrainConfig, "encoders") == ""
    text = " ".join(CliRunner().invoke(cli_main, ["pack", "--help"]).output.split())
    assert f"[{PackConfig.samples_per_shard}]" in text


def test_presets_of_different_configs_have_different_names() -> None:
    from stages.extract import config as extract_config
    from stages.train import config as train_config

    assert not hasattr(extract_config, "PRESETS") and not hasattr(train_config, "PRESETS")
    assert set(extract_config.EXTRACT_PRESETS) == {"tiny", "random-full"}
    assert train_config.TRAIN_PRESETS["tiny"]["model"] == "tiny"


def test_the_int4_even_dim_rule_is_stated_once(tmp_path: Path) -> None:
    from cache_schema import formats
    from stages.extract.config import ExtractConfig

    with pytest.raises(ValueError) as from_formats:
        formats.stored_layout("int4", 7)
    with pytest.raises(ValueError) as from_config:
        ExtractConfig(data="d", out="o", target_format="int4", pca_dims="dino=7").validate()
    assert str(from_config.value) == f"pca_dims: dino={from_formats.value}"
    assert "7 is odd; int4 packs two channels per byte" in str(from_formats.value)


# --------------------------------------------------------------------------- sources


def _sources() -> list[Path]:
    root = Path(__file__).resolve().parents[1]
    return [p for d in ("stages", "cache_schema", "pipeline", "bench") for p in (root / d).rglob("*.py")]


def test_every_notes_file_a_docstring_cites_is_in_the_repo() -> None:
    import re

    root = Path(__file__).resolve().parents[1]
    cited = {m for p in _sources() for m in re.findall(r"`([\w./-]+\.md)`", p.read_text())}
    assert all((root / name).is_file() for name in cited), sorted(
        n for n in cited if not (root / n).is_file()
    )


def test_a_module_alias_names_one_module() -> None:
    import re

    aliases: dict[str, set[str]] = {}
    for path in _sources():
        for module, name, alias in re.findall(
            r"^from ([\w.]+) import (\w+) as (\w+)$", path.read_text(), re.M
        ):
            aliases.setdefault(alias, set()).add(f"{module}.{name}")
    assert aliases.get("R", set()) <= {"stages.common.registry"}, aliases["R"]
