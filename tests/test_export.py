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
from adaptive_ft.export.gguf import interleave_rope_rows

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


# What the quantizers guarantee, whatever CPU runs them. Each weight tensor is cut into blocks (nf4: 64 values of
# the flattened tensor; LLM.int8: one row; GGUF Q8_0: 32 values of a row); a block is scaled by its absmax and
# every value rounded to the nearest level, so no value moves by more than half the widest gap between levels
# times its block's absmax. nf4 has 16 levels in [-1, 1] (widest gap 1 - 0.696: 0.152 x absmax at most) and, with
# double quantization, stores the absmax itself 8-bit (dynamic code, blocks of 256), which adds its own rounding;
# int8 has 255 levels (absmax / 254 at most; bitsandbytes casts the weight to float16 first, 2^-11 relative more);
# Q8_0 the same, with the scale stored as float16 (2^-11 relative).
# Top-1 agreement with the merged model is *not* guaranteed: it flips wherever two logits are closer than the
# perturbation, and the runtime differs by CPU (bitsandbytes runs nf4 through a bf16 kernel on AVX512-BF16 CPUs and
# dequantize + fp32 matmul elsewhere); on the 2-core AMD EPYC the issue names, nf4 gave 0.92 where another gave 0.95+.
BF16_EPS = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)


def _half_gap(code: torch.Tensor) -> float:
    return float(code.float().sort().values.diff().max()) / 2


def _quantized_layers(model, layer_class: str) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if type(m).__name__ == layer_class}


def _nf4_dequantized(module, original: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own dequantization of one Linear4bit, after checking it is within nf4's bound of ``original``."""
    import bitsandbytes.functional as BF

    qs = module.weight.quant_state
    assert (qs.quant_type, qs.blocksize, len(qs.code), qs.nested) == ("nf4", 64, 16, True)
    assert _half_gap(qs.code) == pytest.approx(0.152, abs=1e-3)  # nf4's levels -1, -0.696, ..., 0.723, 1
    deq = BF.dequantize_4bit(module.weight.data, qs)
    blocks = original.flatten().view(-1, qs.blocksize)
    absmax = blocks.abs().amax(dim=1)
    stored = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset  # the absmax as the file keeps it
    absmax_bound = _half_gap(qs.state2.code) * qs.state2.absmax.repeat_interleave(qs.state2.blocksize)[: len(absmax)]
    assert ((stored - absmax).abs() <= absmax_bound + 1e-6 * absmax).all()  # + fp32 rounding of offset and scale
    # w - level * stored = (w - level * absmax) + level * (absmax - stored), and |level| <= 1
    bound = _half_gap(qs.code) * absmax + (stored - absmax).abs()
    err = (deq.flatten().view(-1, qs.blocksize) - blocks).abs()
    assert (err <= bound[:, None] * (1 + 1e-5) + 1e-7).all(), float((err / bound[:, None]).max())
    assert err.max() > 0  # it really is quantized
    return deq


def _int8_dequantized(module, original: torch.Tensor) -> torch.Tensor:
    """LLM.int8's weights (int8 codes CB, row absmax SCB), after checking they are within absmax / 254 per row
    (plus the float16 cast bitsandbytes quantizes from)."""
    w = module.weight
    assert w.CB.dtype == torch.int8 and w.SCB.shape == (original.shape[0],)
    torch.testing.assert_close(w.SCB, original.abs().amax(dim=1), rtol=2.0 ** -11, atol=0)  # the row's absmax
    deq = w.CB.float() * (w.SCB[:, None] / 127)
    err = (deq - original).abs()
    assert (err <= (w.SCB[:, None] / 254 + 2.0 ** -11 * original.abs()) * (1 + 1e-5) + 1e-8).all()
    assert err.max() > 0
    return deq


@pytest.mark.parametrize("name,layer_class", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_bnb_variants_reload_quantized_with_plain_from_pretrained(exported, name, layer_class):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    _, result = exported
    merged = AutoModelForCausalLM.from_pretrained(result.out / "merged").eval()
    original = merged.state_dict()
    model = AutoModelForCausalLM.from_pretrained(result.out / name).eval()
    layers = _quantized_layers(model, layer_class)
    assert len(layers) == 2 * 7  # every projection of both decoder layers
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ in ("Int8Params", "Params4bit")
    gen = torch.Generator().manual_seed(0)
    for key, module in layers.items():
        w = original[f"{key}.weight"]
        deq = (_nf4_dequantized if name == "nf4" else _int8_dequantized)(module, w)
        # The layer computes x @ deq.T, up to its own arithmetic: nf4's bf16 kernel rounds x, the absmax, the level,
        # their product and the output to bf16 (5 roundings of 2^-8; 6 with the fp32 sums; the fp32 path is far
        # inside); LLM.int8 casts x to float16 (2^-11), rounds each row to 255 levels of its absmax (<= absmax / 254
        # per value) and multiplies exactly in int32. Seen on an AVX512-BF16 CPU: nf4 up to 1.1 x 2^-8 (of 6),
        # int8 a fifth of its bound.
        for shape in ((3, 5, w.shape[1]), (1, 1, w.shape[1])):  # a batch and a single token (bnb's gemv path)
            x = 3 * torch.randn(*shape, generator=gen)
            with torch.no_grad():
                y, ref = module(x), x @ deq.T
            if name == "nf4":
                bound = 6 * BF16_EPS * (x.abs() @ deq.abs().T) + 1e-5
            else:
                bound = x.abs().amax(-1, keepdim=True) * (1 / 254 + 2.0 ** -11) * deq.abs().sum(dim=1) + 1e-4
            assert ((y - ref).abs() <= bound).all(), (key, float(((y - ref).abs() / bound).max()))
    # The manifest's agreement is what this variant gives on the probe set, measured against the merged model.
    info = {v.name: v for v in result.variants}[name]
    assert info.agreement == _agreement(merged, model, AutoTokenizer.from_pretrained(result.out / "merged"),
                                        result, info)


def test_nf4_stores_what_bitsandbytes_does_not_quantize_in_bfloat16(exported):
    """The embedding (tied to the output layer) and the norms: bfloat16 in the file, each value the merged fp32
    weight rounded once; every other tensor is a 4-bit weight or a piece of its quantization state."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    _, result = exported
    merged = load_file(result.out / "merged" / "model.safetensors")
    with safe_open(str(result.out / "nf4" / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    plain = [k for k in stored if k in merged and stored[k].dtype != torch.uint8]
    assert sorted(plain) == sorted(k for k, v in merged.items() if v.ndim == 1 or "embed_tokens" in k)
    assert "model.embed_tokens.weight" in plain and "lm_head.weight" not in stored  # tied: stored once
    for k in plain:
        assert stored[k].dtype == torch.bfloat16, k
        torch.testing.assert_close(stored[k], merged[k].to(torch.bfloat16), rtol=0, atol=0, msg=k)
    quant_state = [k for k in stored if k not in merged]
    assert all(".weight." in k for k in quant_state)  # absmax, quant_map, ... of a 4-bit weight
    assert all(stored[k].numel() <= 256 or stored[k].dtype == torch.uint8 for k in quant_state)


def _agreement(merged, variant, tok, result, info) -> float:
    from adaptive_ft.export import probe_prompts

    run = Path(json.loads(result.manifest_path.read_text())["run"])
    probes = probe_prompts(run, tok, 8, json.loads((run / "manifest.json").read_text()))  # as export() built them
    a, b = torch.cat(top1_predictions(merged, tok, probes)), torch.cat(top1_predictions(variant, tok, probes))
    assert len(a) == info.probe_positions > 200
    return round(int((a == b).sum()) / len(a), 6)  # as measure_variants counts it


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
    # q/k pass through llama.cpp's row interleave and transformers' inverse; all of them must come back in place,
    # each value rounded to float16 once: within 2^-11 of itself (2^-25 absolute below f16's normal range).
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                "model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.up_proj.weight"):
        torch.testing.assert_close(back[key], merged[key], rtol=2.0 ** -11, atol=2.0 ** -24)


def test_gguf_q8_0_weights_are_within_q8_0s_bound_of_merged(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result = exported
    merged_model = AutoModelForCausalLM.from_pretrained(result.out / "merged").eval()
    merged = merged_model.state_dict()
    gguf_model, _ = _gguf_model(result.out / "model-q8_0.gguf")
    back = gguf_model.state_dict()
    matrices = [k for k, v in merged.items() if v.ndim == 2 and k != "lm_head.weight"]  # lm_head: the embedding
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(result.out / "model-q8_0.gguf").tensors}
    assert sum(t == "Q8_0" for t in types.values()) == len(matrices) and types["output_norm.weight"] == "F32"
    assert len(matrices) == 2 * 7 + 1  # the projections and the (tied) embedding
    for key in matrices:
        w, deq = merged[key], back[key]
        blocks = w.view(w.shape[0], -1, 32)
        # d = absmax / 127 rounds each value to within d / 2; d stored as float16 moves it by up to 127 * d * 2^-11
        bound = blocks.abs().amax(dim=-1, keepdim=True) * (1 / 254 + 2.0 ** -11) + 127 * 2.0 ** -25
        err = (deq.view_as(blocks) - blocks).abs()
        assert (err <= bound * (1 + 1e-5)).all(), (key, float((err / bound).max()))
        assert err.max() > 0, key  # Q8_0, not a float copy
    torch.testing.assert_close(back["model.norm.weight"], merged["model.norm.weight"], rtol=0, atol=0)  # F32
    tok = AutoTokenizer.from_pretrained(result.out / "merged")
    for name in ("gguf-q8_0", "gguf-f16"):  # the manifest's agreement is measured on what the file holds
        info = {v.name: v for v in result.variants}[name]
        variant = gguf_model if name == "gguf-q8_0" else _gguf_model(result.out / "model-f16.gguf")[0]
        assert info.agreement == _agreement(merged_model, variant, tok, result, info)


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
    # CliRunner's stderr is no terminal: no progress frames (ours or transformers' "Loading weights" bars)
    assert "\r" not in result.output and "Loading weights" not in result.output, result.output
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


# --------------------------------------------------------------------------- what export refuses, and clear errors


def _cli(*args):
    from click.testing import CliRunner

    from adaptive_ft.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _refused(result, *words):
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and "Traceback" not in result.output, result.output
    for w in words:
        assert w in result.output, (w, result.output)


def test_export_into_the_run_itself_is_refused_and_leaves_the_run_as_it_was(exported, tmp_path):
    run, _ = exported
    before = _tree(run)
    for out in (run, run / "adapter", run / "exports" / "v2"):
        _refused(_cli("export", run, "--out", out, "--variants", "merged"), "train run", "outside the run")
    assert _tree(run) == before and not (run / "exports").exists()


def test_export_refuses_a_folder_whose_files_no_export_wrote(exported, tmp_path):
    run, _ = exported
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text('{"my": "own manifest"}')
    (out / "merged").mkdir()
    (out / "merged" / "notes.txt").write_text("keep me")
    before = _tree(out)
    _refused(_cli("export", run, "--out", out, "--variants", "merged"), "manifest.json, merged", "no earlier export")
    assert _tree(out) == before


def test_export_refuses_to_write_over_the_runs_own_base(exported, tmp_path):
    run, _ = exported
    manifest = json.loads((run / "manifest.json").read_text())
    base = Path(manifest["base_model_path"])
    # A run whose base is an earlier export's merged model, exported into that same export folder.
    ex = tmp_path / "ex"
    (ex / "merged").mkdir(parents=True)
    for f in base.iterdir():
        (ex / "merged" / f.name).write_bytes(f.read_bytes())
    (ex / "manifest.json").write_text(json.dumps({"run": "earlier", "variants": []}))
    run2 = tmp_path / "run2"
    (run2 / "adapter").mkdir(parents=True)
    for f in (run / "adapter").iterdir():
        (run2 / "adapter" / f.name).write_bytes(f.read_bytes())
    (run2 / "manifest.json").write_text(json.dumps({**manifest, "base_model_path": str(ex / "merged")}))
    before = _tree(ex)
    _refused(_cli("export", run2, "--out", ex, "--variants", "merged"), "base model", "would replace")
    assert _tree(ex) == before


def test_export_again_into_an_earlier_export_is_allowed(exported, tmp_path):
    run, _ = exported
    for _ in range(2):
        r = _cli("export", run, "--out", tmp_path / "ex", "--variants", "merged", "export.probe_prompts=1",
                 "export.latency_prompts=1", "export.latency_tokens=1")
        assert r.exit_code == 0, r.output


def _copy_run(run: Path, root: Path) -> Path:
    """A copy of ``run`` with its own copy of the base, so a test can damage either."""
    import shutil

    manifest = json.loads((run / "manifest.json").read_text())
    base = shutil.copytree(manifest["base_model_path"], root / "base")
    copy = shutil.copytree(run, root / "run")
    (copy / "manifest.json").write_text(json.dumps({**manifest, "base_model_path": str(base)}))
    return copy


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_a_truncated_safetensors_file_is_a_clear_error_in_export(exported, tmp_path, which):
    run = _copy_run(exported[0], tmp_path)
    path = (tmp_path / "base" / "model.safetensors" if which == "base"
            else run / "adapter" / "adapter_model.safetensors")
    _truncate(path)
    _refused(_cli("export", run, "--out", tmp_path / "ex", "--variants", "merged"),
             str(path.parent), "SafetensorError", "truncated")


def test_a_truncated_gguf_is_a_clear_error_not_a_struct_error(exported, tmp_path):
    from adaptive_ft.errors import ModelError
    from adaptive_ft.lm.models import load_any

    run, result = exported
    data = (result.out / "model-q8_0.gguf").read_bytes()
    for n in (10, 100, len(data) // 2):  # cut in the header, in the metadata, in the tensor data
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(ModelError, match=r"cut\d+\.gguf: cannot be loaded as a causal LM .*truncated"):
            load_any(cut)


def test_the_contracts_variant_name_resolves_wherever_a_variant_path_does(exported, tmp_path):
    from adaptive_ft.lm.models import load_any, resolve_variant

    run, result = exported
    for v in result.variants:  # every name in the manifest -> its path; a path stays itself
        assert resolve_variant(result.out / v.name) == result.out / v.path
        assert resolve_variant(result.out / v.path) == result.out / v.path
    assert resolve_variant(result.out / "gguf-q4") == result.out / "gguf-q4"  # no such variant: unchanged
    by_name, _ = load_any(result.out / "gguf-q8_0")
    by_path, _ = load_any(result.out / "model-q8_0.gguf")
    for (k, a), (_, b) in zip(by_name.state_dict().items(), by_path.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    from adaptive_ft.config import EvaluateConfig
    from adaptive_ft.evaluate import evaluate

    spec = str(result.out / "gguf-q8_0")  # evaluate finds the run from the export's manifest, as for a path
    data = evaluate(None, [spec], tmp_path / "e.json", EvaluateConfig(bootstrap=10, max_new_tokens=2)).data
    assert data["models"] == [spec] and data["run"] == str(run)
    q8 = next(v for v in result.variants if v.name == "gguf-q8_0")  # and its size / latency figures, as by path
    assert data["variants"][spec]["size_bytes"] == q8.size_bytes
    from adaptive_ft.lm.responder import ModelResponder

    assert ModelResponder(spec).name  # the loop's --responder takes the name too


def test_the_export_table_says_what_llama_cpp_made_of_each_gguf():
    from adaptive_ft.cli.ship_cmds import variant_table
    from adaptive_ft.export.stage import VariantInfo

    rows = variant_table([
        VariantInfo("merged", "merged", "hf", 500_000_000, 1.0, 40.0, 1.0),
        VariantInfo("gguf-q8_0", "model-q8_0.gguf", "gguf", 140_000_000, 0.5, 20.0, 0.98,
                    answer_agreement=0.875, answer_prompts=64),
        VariantInfo("gguf-f16", "model-f16.gguf", "gguf", 260_000_000, 0.5, 30.0, 0.99, verify_error="bad magic"),
        VariantInfo("gguf-q8_0", "model-q8_0.gguf", "gguf", 140_000_000, 0.5, 20.0, 0.98),
    ])
    assert rows[1].endswith("—") and "87.5% of 64 equal merged's" in rows[2]
    assert "could not load: bad magic" in rows[3] and "not checked" in rows[4]
