"""Export: merged weights are W + ΔW, int8/nf4 reload quantized with plain from_pretrained, and the GGUF file
reads back through transformers' own GGUF loader as the same model (weights, predictions, tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptive_ft.config import ExportConfig
from adaptive_ft.errors import InputError
from adaptive_ft.export import export, top1_predictions
from adaptive_ft.gguf_export import interleave_rope_rows
from adaptive_ft.modelio import format_for_model

from ship_helpers import CHAT_TEMPLATE, TEXTS, tiny_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    run = tiny_run(root)
    result = export(run, root / "export", ExportConfig(probe_prompts=8, latency_prompts=1, latency_tokens=4))
    return run, result


def test_writes_every_variant_and_the_manifest(exported):
    run, result = exported
    out = result.out
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "tokenizer.json").is_file()
    for name in ("int8", "nf4"):
        assert "quantization_config" in json.loads((out / name / "config.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"] == str(run)
    names = [v["name"] for v in manifest["variants"]]
    assert names == ["merged", "int8", "nf4", "gguf-q8_0", "gguf-f16"]
    for v in manifest["variants"]:
        assert v["size_bytes"] > 0 and v["load_seconds"] > 0 and v["ms_per_token"] > 0
        assert (out / v["path"]).exists() and v["tokenizer_match"] is True
    merged = manifest["variants"][0]
    assert merged["agreement"] == 1.0
    # Quantized variants are smaller than fp32 on disk; Q8_0 about a quarter (+ block scales, tokenizer).
    sizes = {v["name"]: v["size_bytes"] for v in manifest["variants"]}
    assert sizes["gguf-q8_0"] < sizes["gguf-f16"] < sizes["merged"]
    assert sizes["int8"] < sizes["merged"] and sizes["nf4"] < sizes["merged"]


def test_merged_weights_are_base_plus_lora_delta(exported):
    from safetensors.torch import load_file

    run, result = exported
    base = load_file(run.parent / "base" / "model.safetensors")
    merged = load_file(result.out / "merged" / "model.safetensors")
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    key = "model.layers.1.self_attn.q_proj"
    a = adapter[f"base_model.model.{key}.lora_A.weight"]
    b = adapter[f"base_model.model.{key}.lora_B.weight"]
    expected = base[f"{key}.weight"] + scale * b @ a
    torch.testing.assert_close(merged[f"{key}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert (b @ a).abs().max() > 1e-3  # the adapter really changed the weight
    # Modules without adapters are untouched.
    torch.testing.assert_close(merged["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("name,layer_class", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_bnb_variants_reload_quantized_with_plain_from_pretrained(exported, name, layer_class):
    from transformers import AutoModelForCausalLM

    _, result = exported
    model = AutoModelForCausalLM.from_pretrained(result.out / name)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer_class
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ in ("Int8Params", "Params4bit")
    info = {v.name: v for v in result.variants}[name]
    assert info.agreement >= 0.95, info  # a confident model survives 8- and 4-bit weights


def _gguf_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_gguf_f16_weights_read_back_equal_to_merged(exported):
    from transformers import AutoModelForCausalLM

    _, result = exported
    merged = AutoModelForCausalLM.from_pretrained(result.out / "merged").state_dict()
    back, _ = _gguf_model(result.out / "model-f16.gguf")
    back = back.state_dict()
    # q/k pass through llama.cpp's row interleave and transformers' inverse; all of them must come back in place.
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                "model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.up_proj.weight"):
        torch.testing.assert_close(back[key], merged[key], atol=2e-3, rtol=1e-3)


def test_gguf_q8_0_agrees_with_merged_on_the_probe_set(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result = exported
    merged = AutoModelForCausalLM.from_pretrained(result.out / "merged").eval()
    tok = AutoTokenizer.from_pretrained(result.out / "merged")
    gguf_model, _ = _gguf_model(result.out / "model-q8_0.gguf")
    probes = [format_for_model(tok, t) for t in TEXTS[:10]] + TEXTS[:10]
    a = torch.cat(top1_predictions(merged, tok, probes))
    b = torch.cat(top1_predictions(gguf_model, tok, probes))
    agreement = (a == b).float().mean().item()
    assert len(a) > 200 and agreement >= 0.99, agreement
    recorded = {v.name: v.agreement for v in result.variants}
    assert recorded["gguf-q8_0"] >= 0.99 and recorded["gguf-f16"] >= 0.99


def test_gguf_carries_the_tokenizer_and_chat_template(exported):
    from transformers import AutoTokenizer

    _, result = exported
    tok = AutoTokenizer.from_pretrained(result.out / "merged")
    _, back = _gguf_model(result.out / "model-f16.gguf")
    for text in TEXTS[:10] + ["<|im_start|>user\nhi there 123<|im_end|>"]:
        assert back(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    assert back.chat_template == CHAT_TEMPLATE
    assert (back.bos_token, back.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_interleave_rope_rows_by_hand():
    # One head of 4 dims: HF pairs (0,2) and (1,3); llama.cpp wants the pairs adjacent: rows 0,2,1,3.
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    np.testing.assert_array_equal(interleave_rope_rows(w, 1)[:, 0], [0, 4, 2, 6])
    # Two heads are interleaved independently.
    w2 = np.arange(8, dtype=np.float32).reshape(8, 1)
    np.testing.assert_array_equal(interleave_rope_rows(w2, 2)[:, 0], [0, 2, 1, 3, 4, 6, 5, 7])


def test_unknown_variant_is_reported(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"base_model_path": str(tmp_path)}))
    with pytest.raises(InputError, match="unknown variants"):
        export(run, tmp_path / "out", ExportConfig(variants=["merged", "fp8"]))


def test_export_command_merged_only(exported, tmp_path):
    from click.testing import CliRunner

    from adaptive_ft.cli import cli

    run, _ = exported
    result = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "ex"), "--variants", "merged",
                                      "export.probe_prompts=2", "export.latency_prompts=1", "export.latency_tokens=2"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "ex" / "manifest.json").read_text())
    assert [v["name"] for v in manifest["variants"]] == ["merged"] and "merged" in result.output
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == ["manifest.json", "merged"]


def test_a_run_without_adapter_is_reported(tmp_path):
    from ship_helpers import tiny_base

    base = tiny_base(tmp_path / "base")
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"base_model_path": str(base)}))
    with pytest.raises(InputError, match="adapter_config.json"):
        export(run, tmp_path / "out", ExportConfig(variants=["merged"]))
