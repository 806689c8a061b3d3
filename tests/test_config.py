"""Configs: every shipped file loads, every problem is reported at once with its key, overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptive_ft.config import Config, ConfigError, config_reference, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.train.lora.r == 16 and cfg.prioritize.algorithm == "als"


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.lr=1e-4", "train.lora.r=4", "export.variants=merged,gguf", "seed=7"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.lora.r == 4
    assert cfg.export.variants == ["merged", "gguf"]
    assert cfg.seed == 7


def test_int_is_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_every_problem_is_reported_at_once(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n  lora:\n    rr: 8\nprioritize:\n  algorithm: svd\nnope: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert len(err.value.problems) == 3  # type errors first; value checks only once types are right
    assert "train.lr: expected float" in msg
    assert "train.lora.rr: unknown key" in msg
    assert "nope: unknown key" in msg
    assert str(bad) in msg


def test_value_checks_are_collected(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prioritize:\n  algorithm: svd\n  probe_fraction: 2\ntrain:\n  scheduler: step\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    keys = [p.split(":")[0] for p in err.value.problems]
    assert keys == ["prioritize.algorithm", "prioritize.probe_fraction", "train.scheduler", "train.batch_size"]


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["train.lr"])


def test_missing_file_and_non_mapping(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_reference_documents_every_leaf_field():
    rows = config_reference()
    keys = {k for k, _, _ in rows}
    assert {"train.lora.r", "prioritize.event_weights", "seed"} <= keys
    assert all(help_ for _, _, help_ in rows)


def test_docs_config_reference_is_up_to_date():
    from adaptive_ft.config import config_reference_markdown

    doc = Path(__file__).resolve().parents[1] / "docs/config.md"
    assert doc.read_text() == config_reference_markdown(), "regenerate: python -m adaptive_ft.config > docs/config.md"


@pytest.mark.parametrize("override, key", [
    ("evaluate.bootstrap=0", "evaluate.bootstrap"), ("evaluate.weighting=people", "evaluate.weighting"),
    ("evaluate.query_events=[clicks]", "evaluate.query_events"), ("evaluate.max_examples=-1", "evaluate.max_examples"),
    ("ingest.max_field_chars=0", "ingest.max_field_chars"), ("ingest.memory_limit=lots", "ingest.memory_limit"),
    ("ingest.threads=-2", "ingest.threads"), ("simulate.users=0", "simulate.users"),
    ("export.gguf_types=[q4_k]", "export.gguf_types"), ("train.lora.r=0", "train.lora.r"),
])
def test_every_section_checks_its_own_values(override: str, key: str) -> None:
    """Each section's problems() is part of loading: no stage gets a config that was never checked."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_a_section_built_in_code_checks_itself() -> None:
    from adaptive_ft.config import EvaluateConfig, IngestConfig

    assert EvaluateConfig().problems() == [] and IngestConfig().problems() == []
    assert [p.split(":")[0] for p in EvaluateConfig(batch_size=0, min_count=-1).problems()] == \
        ["evaluate.batch_size", "evaluate.min_count"]


def test_flags_and_positional_overrides_are_one_idiom() -> None:
    """A command's flags become overrides ahead of the positional ones, and the result is validated once."""
    from adaptive_ft.cli.common import flag_overrides

    assert flag_overrides({"seed": 3, "train.lr": None, "export.variants": ["merged", "gguf"]}, ("seed=5",)) == \
        ["seed=3", 'export.variants=["merged", "gguf"]', "seed=5"]
    cfg = load_config(overrides=flag_overrides({"seed": 3, "export.variants": ["merged", "gguf"]}))
    assert (cfg.seed, cfg.export.variants) == (3, ["merged", "gguf"])
    with pytest.raises(ConfigError, match="simulate.users"):
        load_config(overrides=flag_overrides({"simulate.users": 0}))
