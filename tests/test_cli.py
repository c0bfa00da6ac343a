"""The `pipeline` command: subcommands, config files and overrides, clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import SUBCOMMANDS, main
from pipeline.config import ConfigError, parse_overrides, resolve_config, save_config


def test_help_lists_every_subcommand():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("data", "extract", "pack", "train", "sample", "evaluate", "analyze", "info", "demo"):
        assert name in SUBCOMMANDS
        assert f"  {name} " in result.output


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@dataclass
class _Cfg:
    steps: int = 10
    lr: float = 1e-4
    name: str = "x"
    encoders: list[str] = field(default_factory=lambda: ["dino"])
    depth: int | None = None
    flag: bool = False


def test_precedence_defaults_file_flags_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"steps": 20, "lr": 0.01, "name": "file", "encoders": ["sam2"]}))
    cfg = resolve_config(
        _Cfg, path, ["lr=3e-4", "encoders=dino,videomae", "flag=true"], {"steps": 30, "name": None}
    )
    assert cfg == _Cfg(steps=30, lr=3e-4, name="file", encoders=["dino", "videomae"], depth=None, flag=True)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["encoders"] == ["dino", "videomae"]


def test_bad_config_keys_and_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        resolve_config(_Cfg, None, ["stepz=3"])
    with pytest.raises(ConfigError, match="'steps'.*integer"):
        resolve_config(_Cfg, None, ["steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(_Cfg, tmp_path / "missing.yaml")


def test_extract_with_missing_weights_fails_at_once_naming_the_flag(synth_videos, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "extract",
            "--data",
            str(synth_videos),
            "--out",
            str(tmp_path / "s.zarr"),
            "--encoders",
            "dino",
            "--dino-model",
            str(tmp_path / "no-such-model"),
            "--preset",
            "tiny",
        ],
    )
    assert result.exit_code != 0
    assert "--dino-model" in result.output and "no-such-model" in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_info_refuses_unknown_paths(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert result.exit_code != 0 and "not a feature store" in result.output
