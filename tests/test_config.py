"""Config validation: unknown keys, wrong types and bad choices name the key."""
import pytest

from mclfir_dist.config import ConfigError, describe
from mclfir_dist.configure import load_config

ROOT_CONFIGS = ["configs/debug_cpu.yaml", "configs/fpi_cpu.yaml", "configs/fpi_methods_cpu.yaml",
                "configs/fpi96_cpu.yaml",
                "configs/paper_gpu.yaml", "configs/paper22_gpu.yaml"]


@pytest.mark.parametrize("path", ROOT_CONFIGS)
def test_shipped_configs_load(path):
    from conftest import ROOT
    cfg = load_config(ROOT / path)
    assert cfg.train.increments


def test_overrides_apply():
    from conftest import ROOT
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", ["train.steps_per_increment=7", "loss.temperature=0.1"])
    assert cfg.train.steps_per_increment == 7 and cfg.loss.temperature == 0.1


@pytest.mark.parametrize("override,key", [
    ("train.stepz=3", "train.stepz"),
    ("loss.temperature=hot", "loss.temperature"),
    ("data.loader=magic", "data.loader"),
    ("train.steps_per_increment=0", "train.steps_per_increment"),
    ("model.trunk=vgg", "model.trunk"),
])
def test_bad_override_names_key(override, key):
    from conftest import ROOT
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/debug_cpu.yaml", [override])
    assert key in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  increments: [{name: a, attributes: [x]}]\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(p)


def test_duplicate_attribute_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  increments: [{name: a, attributes: [x]}, {name: b, attributes: [x]}]\n")
    with pytest.raises(ConfigError, match="already added"):
        load_config(p)


def test_every_key_is_documented():
    lines = describe()
    assert len(lines) > 50
    for line in lines:
        assert line.split(": ", 1)[1].strip(), f"undocumented key: {line}"


@pytest.mark.parametrize("override,message", [
    ("train.log_every=0", "must be > 0"),
    ("data.num_workers=-1", "must be >= 0"),
    ("optim.lr=-1", "must be > 0"),
    ("train.checkpoint_every=-1", "must be >= 0"),
    ("eval.cache_mb=-1", "must be >= 0"),
    ("teacher.decay=1.5", "must be in [0, 1]"),
    ("data.build.test_fraction=0.95", "must be < 1"),
])
def test_numeric_ranges_are_checked_before_any_work(override, message):
    from conftest import ROOT
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/debug_cpu.yaml", [override])
    assert override.split("=")[0] in str(e.value) and message in str(e.value)


def test_override_errors_are_blamed_on_the_overrides_not_the_file():
    from conftest import ROOT
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/debug_cpu.yaml", ["optim.lr=abc"])
    assert "command-line overrides" in str(e.value) and "debug_cpu.yaml" not in str(e.value)


def test_invalid_yaml_is_one_clear_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_every_cli_option_has_help_and_version_works(capsys):
    import argparse
    from mclfir_dist.cli import build_parser, main
    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif not action.help and action.dest != "help":
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")
    walk(build_parser(), ["mclfir"])
    assert not missing
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "mclfir_dist" in capsys.readouterr().out


def test_a_bare_no_is_the_choice_no_not_yaml_false():
    from conftest import ROOT
    from mclfir_dist.configure import load_config
    assert load_config(ROOT / "configs/debug_cpu.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize("var", ["SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_copies_started_by_srun_or_mpirun_without_a_process_group_are_refused(monkeypatch, var):
    """`srun -n 2 mclfir train ...` (no torch launcher): two lone world-1 runs into one --out, refused."""
    from mclfir_dist.training.cluster import check_launcher
    for v in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "1")
    check_launcher()                                     # one copy: a plain single-process run
    monkeypatch.setenv(var, "2")
    with pytest.raises(ConfigError, match=f"{var}=2.*accelerate launch"):
        check_launcher()
    monkeypatch.setenv("WORLD_SIZE", "2")                # under torchrun/accelerate: a real process group
    check_launcher()


@pytest.mark.parametrize("override,message", [
    ("data.label_noise=1.0", "'data.label_noise': must be in [0, 1)"),
    ("data.label_noise=-0.1", "'data.label_noise': must be in [0, 1)"),
    ("model.drop_connect=-0.5", "'model.drop_connect': must be -1"),
    ("model.drop_connect=1.5", "'model.drop_connect': must be -1"),
    ("model.channels_last=sometimes", "'model.channels_last': 'sometimes' is not one of auto, true, false"),
])
def test_study_knobs_are_checked(override, message):
    from conftest import ROOT
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/debug_cpu.yaml", [override])
    assert message in str(e.value)


def test_drop_connect_reaches_the_trunk_and_resnets_refuse_it():
    from conftest import ROOT
    from mclfir_dist.model.trunks import build_trunk
    cfg = load_config(ROOT / "configs/fpi96_cpu.yaml", ["model.pretrained=false"])
    assert cfg.model.drop_connect == 0.0
    trunk, _ = build_trunk(cfg.model, 96)
    assert trunk.net._global_params.drop_connect_rate == 0.0
    default, _ = build_trunk(load_config(ROOT / "configs/fpi96_cpu.yaml", ["model.pretrained=false",
                                                                          "model.drop_connect=-1"]).model, 96)
    assert default.net._global_params.drop_connect_rate == 0.2   # the package's own
    with pytest.raises(ConfigError, match="resnet18 has no stochastic depth"):
        build_trunk(load_config(ROOT / "configs/debug_cpu.yaml", ["model.drop_connect=0.1"]).model, 64)


def test_two_increments_of_one_name_are_refused():
    from conftest import ROOT
    with pytest.raises(ConfigError, match=r"'train.increments\[1\].name': 'a' already names increment 0"):
        load_config(ROOT / "configs/debug_cpu.yaml",
                    ["train.increments=[{name: a, attributes: [colour]},{name: a, attributes: [pattern]}]"])


def test_the_public_load_config_checks_the_registries():
    """config.load_config skipped every registry check (train.method=nosuch passed); the public loader is
    configure.load_config, which fills the registries first."""
    import mclfir_dist.config as schema
    from conftest import ROOT
    from mclfir_dist.configure import load_config
    from mclfir_dist.errors import ConfigError
    assert not hasattr(schema, "load_config")
    with pytest.raises(ConfigError, match="nosuch"):
        load_config(ROOT / "configs/debug_cpu.yaml", ["train.method=nosuch"])


def _bad_values(meta: dict) -> list:
    """Values just outside what a field's own constraint allows."""
    from mclfir_dist.config import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL
    bad = {POSITIVE: [0, -1], NON_NEGATIVE: [-1], UNIT_INTERVAL: [-0.5, 1.5]}.get(meta.get("check"), [])
    if "most" in meta:
        bad.append(meta["most"] + 1)
    if "choices" in meta:
        bad.append("not_a_choice")
    return bad


def test_every_constraint_sits_on_its_field_and_refuses_values_outside_it():
    """The constraints are field metadata (config.constrained); each one refuses, naming its key, and says so in
    --help-config."""
    from mclfir_dist.config import RunConfig, constrained
    fields = constrained(RunConfig)
    assert len(fields) >= 55 and {"data.image_size", "teacher.decay", "eval.split"} <= set(fields)
    helps = {line.split(" ")[0]: line for line in describe()}
    for key, meta in fields.items():
        for value in _bad_values(meta):
            with pytest.raises(ConfigError, match=f"config key '{key}'"):
                load_config("configs/debug_cpu.yaml", [f"{key}={value}"])
        assert ("Values:" in helps[key]) == bool({"check", "most"} & set(meta)), helps[key]
