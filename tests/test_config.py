"""Config validation: unknown keys, wrong types and bad choices name the key."""
import pytest

from mclfir_dist.config import ConfigError, describe, load_config

ROOT_CONFIGS = ["configs/debug_cpu.yaml", "configs/fpi_cpu.yaml", "configs/fpi_methods_cpu.yaml",
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
