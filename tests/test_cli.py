"""The `pipeline` command: subcommands, config files and overrides, clear errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import SUBCOMMANDS, main
from pipeline.config import ConfigError, parse_overrides, resolve_config
from stages.common.runtime import dump_config


def test_help_lists_every_subcommand_without_importing_them():
    """`pipeline --help` stays instant: it imports neither torch nor any stage."""
    check = (
        "import sys\nfrom pipeline.cli import SUBCOMMANDS, main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in sys.modules if m.startswith(('torch', 'stages.'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS:
        assert f"  {name} " in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@dataclass
class _Opt:
    lr: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])


@dataclass
class _Cfg:
    steps: int = 10
    lr: float = 1e-4
    name: str = "x"
    encoders: list[str] = field(default_factory=lambda: ["dino"])
    depth: int | None = None
    flag: bool = False
    weight: float | str = 0.5  # a number, or per-encoder weights "dino=0.5,sam2=0.25"
    dims: int | str | None = None
    vae: str | None = None
    opt: _Opt = field(default_factory=_Opt)


def test_precedence_defaults_file_flags_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"steps": 20, "lr": 0.01, "name": "file", "encoders": ["sam2"]}))
    cfg = resolve_config(
        _Cfg, path, ["lr=3e-4", "encoders=dino,videomae", "flag=true"], {"steps": 30, "name": None}
    )
    assert cfg == _Cfg(steps=30, lr=3e-4, name="file", encoders=["dino", "videomae"], depth=None, flag=True)
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["encoders"] == ["dino", "videomae"]


def test_bad_config_keys_and_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'stepz' for _Cfg \(did you mean 'steps'\?\)"):
        resolve_config(_Cfg, None, ["stepz=3"])
    with pytest.raises(ConfigError, match="'steps'.*integer"):
        resolve_config(_Cfg, None, ["steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(_Cfg, tmp_path / "missing.yaml")


def test_nested_yaml_merges_key_by_key_and_dotlist_wins(tmp_path):
    """A file's nested mapping merges into the nested config key by key (opt.betas keeps its
    default); a dotted --set beats the file, the flag and the base; the dump resolves back."""
    path = tmp_path / "c.yaml"
    path.write_text("opt:\n  lr: 0.5\nsteps: 20\nweight: 1\n")
    overrides = ["opt.lr=0.25", "opt.betas=0.8,0.9", "steps=40"]
    cfg = resolve_config(_Cfg, path, overrides, {"steps": 30}, base={"steps": 15, "name": "p"})
    assert cfg == _Cfg(steps=40, name="p", weight=1.0, opt=_Opt(lr=0.25, betas=[0.8, 0.9]))
    assert isinstance(cfg.opt, _Opt) and isinstance(cfg.weight, float)
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert resolve_config(_Cfg, base=yaml.safe_load((tmp_path / "resolved.yaml").read_text())) == cfg
    with pytest.raises(ConfigError) as info:
        resolve_config(_Cfg, None, ["opt.lr=abc"])
    assert info.value.message == "config key 'opt.lr': expected a number, got 'abc'"
    with pytest.raises(ConfigError) as info:
        resolve_config(_Cfg, None, ["opt.lrr=1"])
    unknown = "unknown config key 'opt.lrr' for _Opt (did you mean 'lr'?); known keys: betas, lr"
    assert info.value.message == unknown
    with pytest.raises(ConfigError) as info:
        resolve_config(_Cfg, None, ["opt=3"])
    assert info.value.message == "config key 'opt': expected a mapping, got 3"


def test_a_config_file_error_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 1\n")
    with pytest.raises(ConfigError) as info:
        resolve_config(_Cfg, path)
    assert info.value.message.startswith(
        f"unknown config key 'stepz' for _Cfg (did you mean 'steps'?) (in config file {path}); known keys: "
    )
    path.write_text("opt: {betas: [0.9, x]}\n")
    with pytest.raises(ConfigError) as info:
        resolve_config(_Cfg, path)
    expected = f"config key 'opt.betas': expected a list of numbers, got [0.9, \"x\"] (in config file {path})"
    assert info.value.message == expected


@pytest.mark.parametrize(
    "source,value,expected",
    [
        ("flag", "0.5", 0.5),  # click hands `--lambda 0.5` over as text
        ("set", "1", 1.0),  # YAML reads an int; OmegaConf alone refuses an int for float | str
        ("set", "dino=0.5,sam2=0.25", "dino=0.5,sam2=0.25"),
        ("file", "'0.5'", 0.5),
    ],
)
def test_a_union_takes_its_first_member_that_fits(source, value, expected, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"weight: {value}\ndims: '64'\n")
    flags = {"weight": value, "dims": "64"} if source == "flag" else None
    overrides = [f"weight={value}", "dims=64"] if source == "set" else []
    cfg = resolve_config(_Cfg, path if source == "file" else None, overrides, flags)
    assert cfg.weight == expected and type(cfg.weight) is type(expected)
    assert cfg.dims == 64
    assert resolve_config(_Cfg, None, ["dims=dino=8"]).dims == "dino=8"


def test_set_keeps_a_string_fields_text_and_other_fields_typed():
    """YAML would make `no` false and `007` 7; a string field takes the text as typed, while
    numbers, booleans and null still parse for the fields of those types."""
    cfg = resolve_config(_Cfg, None, ["vae=no", "name=007", "steps=4e5", "flag=yes", "depth=null", "lr=3e-4"])
    got = (cfg.vae, cfg.name, cfg.steps, cfg.flag, cfg.depth, cfg.lr)
    assert got == ("no", "007", 400000, True, None, 3e-4)
    assert resolve_config(_Cfg, None, ["vae=null", "name="]) == _Cfg(vae=None, name="")
    assert resolve_config(_Cfg, None, ["name={a"]).name == "{a"  # not YAML: the text itself
    assert resolve_config(_Cfg, None, ["name=run-${steps}", "steps=3"]).name == "run-3"
    with pytest.raises(ConfigError) as info:
        resolve_config(_Cfg, None, ["name=${nope}"])
    assert info.value.message == (
        "config key 'name': '${nope}' does not resolve (Interpolation key 'nope' not found); "
        "write \\${ for a literal ${"
    )
    assert resolve_config(_Cfg, None, [r"name=\${nope}"]).name == "${nope}"


def test_every_stage_config_loads_through_its_schema():
    """Each stage config's field types are ones OmegaConf holds: defaults resolve to the defaults."""
    from pipeline.demo import DemoConfig
    from stages.common.fvd import EvalConfig
    from stages.export.export import ExportConfig
    from stages.extract.config import ExtractConfig
    from stages.pack.packer import PackConfig
    from stages.sample.config import SampleConfig
    from stages.train.config import TrainConfig

    for cls in (DemoConfig, EvalConfig, ExportConfig, ExtractConfig, PackConfig, SampleConfig, TrainConfig):
        assert resolve_config(cls) == cls()


@pytest.mark.parametrize(
    "override,message",
    [
        ("lr=abc", "config key 'lr': expected a number, got 'abc'"),
        ("stepz=3", "unknown config key 'stepz' for TrainConfig (did you mean 'steps'?); known keys: "),
        ("align_lambda=[1]", "config key 'align_lambda': expected a number or a string, got [1]"),
    ],
)
def test_cli_prints_one_error_line_naming_the_key_and_exits_2(override, message, tmp_path):
    args = ["train", "--shards", "s", "--out", str(tmp_path / "r"), "--set", override]
    result = CliRunner().invoke(main, args)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith(f"Error: {message}")
    assert not (tmp_path / "r").exists()


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


def test_info_refuses_unknown_paths_and_plain_zarr_groups(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert result.exit_code != 0 and "not a feature store" in result.output
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("x", shape=(2,), dtype="int8")
    result = CliRunner().invoke(main, ["info", str(tmp_path / "plain.zarr")])
    assert result.exit_code == 1 and "not an align4gen feature store" in result.output
    assert "Traceback" not in result.output and "KeyError" not in result.output


@pytest.mark.parametrize(
    "override,message",
    [
        ("steps=[1]", "config key 'steps': expected an integer, got [1]"),
        ("lr=[1,2]", "config key 'lr': expected a number, got [1, 2]"),
        ("steps=null", "config key 'steps': expected an integer, got null"),
        ("name={a: 1}", "config key 'name': expected a string, got {\"a\": 1}"),
        ("flag=[]", "config key 'flag': expected a boolean (true or false), got []"),
        ("depth=[3]", "config key 'depth': expected an integer or null, got [3]"),
        ("encoders=null", "config key 'encoders': expected a list of strings, got null"),
        ("encoders=5", "config key 'encoders': expected a list of strings, got 5"),
    ],
)
def test_list_and_null_values_name_the_key_and_the_type(override, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(_Cfg, None, [override])
    assert str(info.value.message) == message


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--shards", "s", "--out", "r", "--set", "steps=[1]"],
        ["train", "--shards", "s", "--out", "r", "--set", "lr=[1,2]"],
        ["train", "--shards", "s", "--out", "r", "--set", "steps=null"],
        ["extract", "--data", "d", "--out", "o", "--set", "frames=[8]"],
        ["sample", "--run", "r", "--set", "num=[2]"],
    ],
)
def test_cli_refuses_list_and_null_values_with_exit_2(args, tmp_path):
    key = args[-1].split("=")[0]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"config key '{key}': expected" in result.output
    config = tmp_path / "c.yaml"
    config.write_text("steps: [1, 2]\n")
    result = CliRunner().invoke(main, ["train", "--shards", "s", "--out", "r", "--config", str(config)])
    assert result.exit_code == 2 and "config key 'steps': expected an integer, got [1, 2]" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--size", "30"],
            "size: 30 is not a multiple of 16 (the VAE's spatial factor 8 x patch 2); use e.g. 16, 32",
        ),
        (["--pca-dims", "64"], "pca_dims: dino=64 exceeds the encoder's feature dim 32"),
        (["--dino-size", "7"], "dino_size: 7 is not a multiple of DINOv2's patch 14; use e.g. 14, 28"),
        (["--set", "sam2_size=40"], "sam2_size: 40 is not a multiple of 32; use e.g. 32, 64"),
    ],
)
def test_extract_sizes_are_checked_against_model_configs_before_loading(args, message, tmp_path):
    """Read from the models' config.json files: exit 2 before any weights load (the checks after
    loading exit 1)."""
    out = tmp_path / "store"
    base = [
        "extract",
        "--data",
        str(tmp_path),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--encoders",
        "dino,sam2",
    ]
    result = CliRunner().invoke(main, [*base, *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()
