"""Export: merge the LoRA adapter into its base and write deployable variants, each measured.

::

    from adaptive_ft.export import export
    result = export("runs/r1", "export/r1", ExportConfig(variants=["merged", "int8", "nf4", "gguf"]))

Variants (docs/contracts.md, "Export"):

- ``merged``: the base with ``W + (alpha/r) B A`` folded in, fp32 safetensors HF folder + tokenizer;
- ``int8`` / ``nf4``: the merged model quantized by bitsandbytes (LLM.int8() and 4-bit NormalFloat), saved as
  HF folders whose ``config.json`` carries the ``quantization_config``, so plain ``from_pretrained`` reloads them
  quantized (bitsandbytes 0.50 quantizes, saves and runs both on CPU: checked, and tested here);
- ``gguf-q8_0`` / ``gguf-f16``: GGUF files for llama.cpp-style runtimes (:mod:`adaptive_ft.gguf_export`).

Each variant is reloaded from disk and measured the same way: size on disk, load time, CPU milliseconds per
generated token (greedy), and top-1 next-token agreement with the merged model at every position of a fixed
probe set (the first ``probe_prompts`` test prompts of the run's split, formatted as training formatted them).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adaptive_ft.config import ExportConfig
from adaptive_ft.errors import InputError, ModelError
from adaptive_ft.lm.models import load_any, read_run
from adaptive_ft.lm.tokens import format_for_model

# Messages bitsandbytes prints on every int8 matmul on CPU; they say nothing the manifest does not.
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")


@dataclass
class VariantInfo:
    """One exported variant, as recorded in ``EXPORT/manifest.json``."""

    name: str
    path: str
    format: str
    size_bytes: int
    load_seconds: float
    ms_per_token: float
    agreement: float
    probe_positions: int = 0
    tokenizer_match: bool = True
    runtime: str = ""


@dataclass
class ExportResult:
    """What :func:`export` wrote."""

    out: Path
    manifest_path: Path
    variants: list[VariantInfo]


def export(run: str | Path, out: str | Path, cfg: ExportConfig | None = None) -> ExportResult:
    """Merge ``run``'s adapter, write each variant of ``cfg.variants`` under ``out`` and measure it."""
    cfg = cfg or ExportConfig()
    run, out = Path(run), Path(out)
    manifest = read_run(run)
    problems = cfg.problems()  # the config's own checks, for callers that built an ExportConfig in code
    if problems:
        raise InputError("export: " + "; ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    merged_dir = out / "merged"
    merged, tokenizer = merge_adapter(run, manifest)
    _save_hf(merged, tokenizer, merged_dir)
    written: list[tuple[str, str, str]] = [("merged", "merged", "hf")]
    for name in ("int8", "nf4"):
        if name in cfg.variants:
            quantize_bnb(merged_dir, out / name, name, cfg.int8_threshold)
            written.append((name, name, "hf"))
    if "gguf" in cfg.variants:
        from adaptive_ft.gguf_export import write_gguf  # deferred: the gguf writer loads only for GGUF variants

        for qtype in cfg.gguf_types:
            write_gguf(merged, tokenizer, out / f"model-{qtype}.gguf", qtype, name=str(manifest.get("base_model")))
            written.append((f"gguf-{qtype}", f"model-{qtype}.gguf", "gguf"))
    del merged

    probes = probe_prompts(run, tokenizer, cfg.probe_prompts, manifest)
    infos = measure_variants(out, written, probes, cfg)
    if "merged" not in cfg.variants:  # it was needed to build the others, but not asked for
        shutil.rmtree(merged_dir)
        infos = [v for v in infos if v.name != "merged"]
    path = out / "manifest.json"
    path.write_text(json.dumps({"run": str(run), "base_model": manifest.get("base_model"),
                                "base_model_path": manifest.get("base_model_path"),
                                "probe_prompts": len(probes), "new_tokens": cfg.latency_tokens,
                                "variants": [asdict(v) for v in infos]}, indent=2))
    return ExportResult(out=out, manifest_path=path, variants=infos)


def merge_adapter(run: Path, manifest: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """The run's base (fp32) with the adapter folded into its weights: ``peft``'s ``merge_and_unload``."""
    from peft import PeftModel

    base, tokenizer = load_any(manifest["base_model_path"])
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(f"{adapter}: no adapter_config.json; is {run} a finished train run (adaptive-ft train)?")
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    model.eval()
    return model, tokenizer


def _save_hf(model: torch.nn.Module, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def quantize_bnb(merged_dir: Path, out: Path, kind: str, int8_threshold: float = 6.0) -> None:
    """Load the merged folder through bitsandbytes (int8 or nf4) on CPU and save it with its quantization config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if kind == "int8":
        # SmolLM2-135M fine-tuned on Banking77, top-1 agreement with merged on 16 probes: 87% at bitsandbytes'
        # default 6.0, 93% at 2.0, 95% at 0.5 (small models have many activation outliers).
        qcfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold)
    else:
        # fp32 compute: CPU has no fast bf16/fp16 matmul on every machine, and it keeps nf4 error to the weights.
        # (bitsandbytes 0.50 overrides it at inference on AVX512-BF16 CPUs: a fused bf16 kernel; see RUNTIMES.)
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=qcfg, device_map="cpu",
                                                     dtype=torch.float32)
    except Exception as e:  # bitsandbytes raises many types; say which variant and what to do
        raise ModelError(f"export {kind}: bitsandbytes could not quantize {merged_dir}: {e}. "
                         "Check `python -m bitsandbytes`, or export without this variant.") from e
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(merged_dir).save_pretrained(out)


def probe_prompts(run: Path, tokenizer: Any, n: int, manifest: dict[str, Any] | None = None) -> list[str]:
    """The fixed probe set: the first ``n`` test prompts of the run's split (by example id), chat-formatted."""
    import polars as pl

    split_path = run / "split.parquet"
    prompts: list[str] = []
    if split_path.is_file():
        frame = pl.read_parquet(split_path).filter(pl.col("split") == "test").sort("example_id")
        prompts = frame["prompt"].head(n).to_list()
    if not prompts:
        prompts = ["Hello, how can I help you today?", "My card payment was declined.", "What is 2 + 2?"]
    return [format_for_model(tokenizer, p, manifest) for p in prompts]


def dir_size(path: Path) -> int:
    """Bytes on disk of a file or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# What ms_per_token measured: every variant runs under transformers on CPU. A GGUF file is dequantized to fp32
# by transformers' loader, so its latency is the fp32 model's, not what llama.cpp would do with Q8_0 / F16 kernels.
RUNTIMES = {"merged": "transformers fp32", "int8": "transformers + bitsandbytes LLM.int8 (CPU)",
            "nf4": "transformers + bitsandbytes nf4, fp32 compute (CPU)",
            "nf4-bf16": "transformers + bitsandbytes nf4, bf16 fused kernel (this CPU has AVX512-BF16)",
            "gguf": "transformers GGUF loader, dequantized to fp32 (not llama.cpp kernels)"}


def measure_variants(out: Path, written: list[tuple[str, str, str]], probes: list[str],
                     cfg: ExportConfig) -> list[VariantInfo]:
    """Reload each variant from disk and measure it against the merged model's top-1 predictions."""
    reference: list[torch.Tensor] | None = None
    ref_tok = None
    infos = []
    for name, rel, fmt in tqdm(written, desc="measuring variants", unit="variant", disable=None):
        start = time.perf_counter()
        model, tokenizer = load_any(out / rel)
        load_s = time.perf_counter() - start
        ref_tok = ref_tok or tokenizer  # merged comes first
        # Agreement feeds every variant the merged tokenizer's ids, so it measures the weights alone; whether the
        # variant's own tokenizer (a GGUF's is rebuilt from its metadata) encodes the probes the same is a flag.
        preds = top1_predictions(model, ref_tok, probes)
        reference = reference or preds
        agree = sum(int((a == b).sum()) for a, b in zip(preds, reference))
        total = sum(len(a) for a in reference)
        same_ids = all(tokenizer(p, add_special_tokens=False).input_ids == ref_tok(p, add_special_tokens=False).input_ids
                       for p in probes)
        ms = ms_per_token(model, tokenizer, probes[: cfg.latency_prompts], cfg.latency_tokens)
        infos.append(VariantInfo(name=name, path=rel, format=fmt, size_bytes=dir_size(out / rel),
                                 load_seconds=round(load_s, 4), ms_per_token=round(ms, 3),
                                 agreement=round(agree / max(total, 1), 6), probe_positions=total,
                                 tokenizer_match=same_ids, runtime=RUNTIMES[_runtime_key(name)]))
        del model
    return infos


def _runtime_key(name: str) -> str:
    """RUNTIMES' key for a variant: nf4 runs bitsandbytes' bf16 kernel in eval mode where the CPU has AVX512-BF16."""
    if name == "nf4":
        from bitsandbytes.functional import has_avx512bf16

        return "nf4-bf16" if has_avx512bf16() else "nf4"
    return name.split("-")[0]


@torch.no_grad()
def top1_predictions(model: torch.nn.Module, tokenizer: Any, prompts: list[str]) -> list[torch.Tensor]:
    """For each prompt, the argmax next token at every position: (T,) per prompt."""
    out = []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        out.append(model(input_ids=ids).logits[0].float().argmax(-1))
    return out


@torch.no_grad()
def ms_per_token(model: torch.nn.Module, tokenizer: Any, prompts: list[str], new_tokens: int) -> float:
    """CPU wall milliseconds per generated token, greedy, batch 1, KV cache on (what a local user sees)."""
    total_ms, total_tokens = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        start = time.perf_counter()
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        total_ms += (time.perf_counter() - start) * 1000
        total_tokens += gen.shape[1] - ids.shape[1]
    return total_ms / max(total_tokens, 1)
