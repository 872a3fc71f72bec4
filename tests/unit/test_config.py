import pytest

from rea2seg_ray.config import ConfigError, EvaluateConfig, MakeScenesConfig, load_config


def test_defaults_yaml_then_overrides(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text("k: 5\ntitle: From file\n")
    cfg = load_config(EvaluateConfig, f, ["predictions=p", "dataset=d", "output=o", "title=Override"])
    assert isinstance(cfg, EvaluateConfig)
    assert (cfg.k, cfg.title, cfg.predictions, cfg.texts) == (5, "Override", "p", "first")


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'outptu'.*Did you mean: 'output'"):
        load_config(EvaluateConfig, None, ["outptu=x"])


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("n: 3\nwidht: 100\n")
    with pytest.raises(ConfigError) as e:
        load_config(MakeScenesConfig, f, ["output=x"])
    assert "widht" in str(e.value) and "bad.yaml" in str(e.value)


def test_wrong_type_and_missing_required_keys():
    with pytest.raises(ConfigError, match="'n'"):
        load_config(MakeScenesConfig, None, ["output=x", "n=many"])
    with pytest.raises(ConfigError, match="missing required config key.*output"):
        load_config(MakeScenesConfig, None, [])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(MakeScenesConfig, None, ["output"])


def test_shipped_configs_load():
    cfg = load_config(MakeScenesConfig, "make-scenes.yaml", ["output=x"])
    assert cfg.n == 16 and list(cfg.categories) == ["discriminative", "geometric", "spatial", "multi-step"]
