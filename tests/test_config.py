"""Recipes: YAML + dotted overrides into typed dataclasses, with errors naming the key."""

from pathlib import Path

import pytest

from loradrop_ds.config import Config, ConfigError, dump_yaml, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def test_embedded_default_is_the_dataclass_defaults_and_matches_recipes_default_yaml():
    default = load_config(None)
    assert default == Config()
    assert load_config(REPO / "recipes" / "default.yaml") == default


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_says_how_to_launch(recipe):
    load_config(recipe)
    header = recipe.read_text().split("\n\n")[0]
    assert header.startswith("#") and "launch/train.py" in header and "hardware" in header.lower()


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "train.max_steps=7", "lora.target_modules=[q_proj,v_proj]",
                             "loradrop.granularity=module", "loradrop.warm_start=true", "data.eval_file=null",
                             "lora.alpha=32", "model.tokenizer=/some/dir"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.loradrop.granularity == "module" and cfg.loradrop.warm_start is True
    assert cfg.data.eval_file is None and cfg.lora.alpha == 32.0
    assert load_config(None, ["lora.target_modules=q_proj,k_proj"]).lora.target_modules == ["q_proj", "k_proj"]


def test_overrides_win_over_the_yaml_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 0.5\n  max_steps: 3\nlora:\n  r: 4\n")
    cfg = load_config(recipe, ["train.lr=0.25"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.lora.r) == (0.25, 3, 4)
    assert cfg.train.micro_batch_size == Config().train.micro_batch_size  # untouched keys keep defaults


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["loradrop.threshold=0.75", "lora.target_modules=[q_proj]"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["train.max_stepz=3"], "unknown setting train.max_stepz"),
    (["trian.lr=3"], "unknown setting trian"),
    (["train.max_steps=abc"], "train.max_steps: expected int"),
    (["train.max_steps=2.5"], "train.max_steps: expected int"),
    (["lora.dropout=yes"], "lora.dropout: expected float"),
    (["loradrop.granularity=block"], "loradrop.granularity: 'block' is not one of ['layer', 'module']"),
    (["model.dtype=fp8"], "model.dtype: 'fp8' is not one of"),
    (["loradrop.warm_start=maybe"], "loradrop.warm_start: expected bool"),
    (["train.lr.peak=1"], "train.lr: expected float"),
    (["train.lr=1", "train.lr.peak=1"], "train.lr.peak: lr is a value, not a group of settings"),
    (["train=3"], "train: expected a mapping"),
    (["no_equals_sign"], "not of the form dotted.key=value"),
    (["loradrop.threshold=0"], "loradrop.threshold (T) must be in (0, 1]"),
    (["loradrop.threshold=1.01"], "loradrop.threshold (T) must be in (0, 1]"),
    (["lora.r=0"], "lora.r must be a positive integer"),
    (["lora.r=-4"], "lora.r must be a positive integer"),
    (["lora.target_modules=[]"], "lora.target_modules is empty"),
    (["loradrop.sample_ratio=0"], "loradrop.sample_ratio (alpha) must be in (0, 1]"),
    (["train.micro_batch_size=0"], "train.micro_batch_size must be >= 1"),
])
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "nested.yaml").write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError, match="unknown setting lora.rank"):
        load_config(tmp_path / "nested.yaml")


def test_threshold_one_is_allowed():
    assert load_config(None, ["loradrop.threshold=1.0"]).loradrop.threshold == 1.0


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_preempt_signals_are_named_signals_that_only_set_a_flag():
    """train.preempt_signals: catchable signal names only; installed, a signal only sets the
    flag (repeats recorded, nothing raised); [] gives the previous handlers back."""
    import os
    import signal

    from loradrop_ds import preemption

    assert load_config(None).train.preempt_signals == ["SIGTERM", "SIGUSR1"]
    assert load_config(None, ["train.preempt_signals=[]"]).train.preempt_signals == []
    for bad in ("SIGKILL", "USR1", "SIGSEGV"):
        with pytest.raises(ConfigError, match=rf"train.preempt_signals\[0\]: '{bad}' is not one of \['SIGTERM'"):
            load_config(None, [f"train.preempt_signals=[{bad}]"])
    before = signal.getsignal(signal.SIGUSR2)
    try:
        preemption.install(["SIGUSR2"])
        assert not preemption.requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert preemption.requested() and preemption.received() == ["SIGUSR2", "SIGUSR2"]
        preemption.install([])  # a later run without signals: the flag cleared, the handler restored
        assert not preemption.requested() and signal.getsignal(signal.SIGUSR2) is before
    finally:
        signal.signal(signal.SIGUSR2, before)
