"""RunConfig: loading, overrides and errors that name the key."""

import re

import pytest

from gold_ray.config import ConfigError, RunConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_valid_yaml_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "task: {name: ag_news}\nbudget: {samples: 100}\n"))
    assert cfg.task.name == "ag_news"
    assert cfg.budget.samples == 100
    assert cfg.strategy.band_lo == 0.5 and cfg.strategy.band_hi == 0.8
    assert cfg.teacher.serve.host == "127.0.0.1"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy\.bandd_lo"):
        load_config(write(tmp_path, "strategy: {bandd_lo: 0.1}\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"budget\.samples"):
        load_config(write(tmp_path, "budget: {samples: lots}\n"))


def test_negative_budget_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"budget\.samples"):
        load_config(write(tmp_path, "budget: {samples: -5}\n"))


def test_band_lo_above_hi_is_refused():
    with pytest.raises(ConfigError, match="band_lo"):
        load_config(None, ["strategy.band_lo=0.9", "strategy.band_hi=0.5"])


def test_unknown_strategy_is_named():
    with pytest.raises(ConfigError, match=r"strategy\.name"):
        load_config(None, ["strategy.name=magic"])


def test_a_bad_override_is_named_as_the_override_not_as_the_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "budget: {samples: 100}\n"), ["budget.sample=96"])
    path = write(tmp_path, "budget: {samples: 100}\nstrategy: {bandd_lo: 0.1}\n")
    assert str(err.value).startswith("--set overrides:\n  budget.sample: ") and "did you mean 'samples'" in str(err.value)
    # Errors of both: the file is named, with its overrides; the file's own error alone names the file.
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))} with its --set overrides:"):
        load_config(path, ["budget.samples=abc"])
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:"):
        load_config(path, ["budget.samples=96"])


def test_overrides_apply_and_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "strategy: {name: gold}\n"), ["strategy.name=zerogen", "budget.samples=64",
                                                                    "teacher.temperature=0.7"])
    assert cfg.strategy.name == "zerogen"
    assert cfg.budget.samples == 64
    assert cfg.teacher.temperature == pytest.approx(0.7)


def test_malformed_override_is_refused():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["strategy.name"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "task: [unclosed\n"))


def test_yaml_roundtrip_keeps_every_value(tmp_path):
    cfg = load_config(None, ["seed=7", "strategy.iterations=3"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg
    assert isinstance(again, RunConfig)


def test_per_iteration_samples():
    cfg = load_config(None, ["budget.samples=10", "strategy.iterations=3"])
    assert cfg.per_iteration_samples() == 3


def test_custom_ray_resources_reach_every_placement_and_bad_ones_are_named():
    from actors.scoring import scorer_resources
    from actors.teacher import deployment_options

    cfg = load_config(None, ["teacher.serve.resources={teacher: 1}", "resources.scorer_resources={scorer: 0.5}",
                             "resources.train_resources_per_worker={trainer: 1}"])
    assert deployment_options(cfg)["ray_actor_options"]["resources"] == {"teacher": 1}
    assert scorer_resources(cfg)["resources"] == {"scorer": 0.5}
    assert "resources" not in deployment_options(RunConfig())["ray_actor_options"]
    with pytest.raises(ConfigError, match="resources.scorer_resources.*'CPU' has its own setting"):
        load_config(None, ["resources.scorer_resources={CPU: 1}"])
    with pytest.raises(ConfigError, match="teacher.serve.resources.*'teacher' must be >= 0"):
        load_config(None, ["teacher.serve.resources={teacher: -1}"])
