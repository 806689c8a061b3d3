"""The export stage: merge the run's adapter, write each variant, reload each from disk and measure it.

What each variant is and how it is measured: the package docstring (:mod:`adaptive_ft.export`).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adaptive_ft.config import ExportConfig
from adaptive_ft.errors import InputError, ModelError
from adaptive_ft.export import llamacpp
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
    # The runtimes that loaded this file and checked it against the merged model: transformers for every
    # variant (``agreement``), and llama.cpp for a GGUF file where llama-cpp-python is installed
    # (``answer_agreement``: share of probe prompts whose greedy answer equals the merged model's).
    verified_by: list[str] = field(default_factory=list)
    answer_agreement: float | None = None
    answer_prompts: int = 0
    verify_error: str = ""


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
    check_out(run, out, manifest)
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
        from adaptive_ft.export.gguf import write_gguf  # deferred: the gguf writer loads only for GGUF variants

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


# What export writes under EXPORT/ (docs/contracts.md, "Export"); an earlier export's copies may be replaced.
EXPORT_ENTRIES = ("manifest.json", "merged", "int8", "nf4", "model-q8_0.gguf", "model-f16.gguf")


def check_out(run: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Refuse an ``out`` where export would write over files it did not write: the train run itself or a folder
    inside it (``export RUN --out RUN`` would replace the run's manifest.json), a folder whose entries of the
    export's names were not written by an earlier export, or the folder holding the run's own base model."""
    r, o = run.resolve(), out.resolve()
    if o == r or r in o.parents:
        raise InputError(f"export --out {out}: that is the train run {run} or a folder inside it; export writes "
                         f"manifest.json and model folders there and would replace the run's own. Choose a folder "
                         f"outside the run, e.g. --out {run.parent / (run.name + '-export')}")
    if o.exists() and not o.is_dir():
        raise InputError(f"export --out {out}: is a file; give a folder (new, or an earlier export's)")
    base = Path(str(manifest.get("base_model_path") or "")).resolve()
    for name in EXPORT_ENTRIES:
        if base == o / name or (o / name) in base.parents:
            raise InputError(f"export --out {out}: the run's base model {base} lies in {o / name}, which export "
                             "would replace while merging into it; choose another --out folder")
    taken = [name for name in EXPORT_ENTRIES if (o / name).exists()]
    if taken and not _is_export_manifest(o / "manifest.json"):
        raise InputError(f"export --out {out}: already holds {', '.join(taken)}, which no earlier export wrote "
                         "(there is no export manifest.json there) and which export would replace; choose a "
                         "new or empty folder")


def _is_export_manifest(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("variants"), list) and "run" in data


def merge_adapter(run: Path, manifest: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """The run's base (fp32) with the adapter folded into its weights: ``peft``'s ``merge_and_unload``."""
    from peft import PeftModel
    from safetensors import SafetensorError

    base, tokenizer = load_any(manifest["base_model_path"])
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(f"{adapter}: no adapter_config.json; is {run} a finished train run (adaptive-ft train)?")
    try:
        model = PeftModel.from_pretrained(base, adapter)
    except (SafetensorError, OSError, ValueError, KeyError) as e:  # a truncated or foreign adapter file
        raise ModelError(f"{adapter}: the adapter cannot be read ({type(e).__name__}: {e}); a truncated or "
                         f"partly copied adapter_model.safetensors reads like this. Copy the run again, or "
                         f"re-train it") from None
    model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


def _save_hf(model: torch.nn.Module, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def quantize_bnb(merged_dir: Path, out: Path, kind: str, int8_threshold: float = 6.0,
                 half_unquantized: torch.dtype | None = torch.bfloat16) -> None:
    """Load the merged folder through bitsandbytes (int8 or nf4) on CPU and save it with its quantization config.

    nf4 with ``half_unquantized`` (a 16-bit dtype): what bitsandbytes leaves unquantized (the embedding, tied to
    the output layer, and the norms) is stored in that dtype (:func:`half_unquantized_weights`); None keeps fp32.
    """
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
    if kind == "nf4" and half_unquantized is not None:
        half_unquantized_weights(model, half_unquantized)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(merged_dir).save_pretrained(out)


def half_unquantized_weights(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Every fp32 weight bitsandbytes left unquantized (the embedding and the output layer tied to it, the norms)
    cast to ``dtype`` in place; returns the names cast.

    In a 135M model the 49k-token embedding is a fifth of the weights, so in fp32 it is most of an nf4 file.
    transformers reloads these tensors in the dtype they were saved in (whatever ``dtype`` ``from_pretrained``
    is given), so the model then runs its residual stream in that dtype around the 4-bit layers.
    """
    done: dict[str, str] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or type(param).__name__ in ("Params4bit", "Int8Params") or param.dtype != torch.float32:
            continue
        seen.add(id(param))
        param.data = param.data.to(dtype)
        done[name] = str(dtype).removeprefix("torch.")
    return done


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
            "nf4": "transformers + bitsandbytes nf4, fp32 compute in the 4-bit layers (CPU)",
            "nf4-bf16": "transformers + bitsandbytes nf4, bf16 fused kernel (this CPU has AVX512-BF16)",
            "gguf": "transformers GGUF loader, dequantized to fp32 (not llama.cpp kernels)"}


def measure_variants(out: Path, written: list[tuple[str, str, str]], probes: list[str],
                     cfg: ExportConfig) -> list[VariantInfo]:
    """Reload each variant from disk and measure it against the merged model's top-1 predictions; run each GGUF
    file in llama.cpp too where llama-cpp-python is installed (greedy answers against the merged model's)."""
    reference: list[torch.Tensor] | None = None
    ref_tok = None
    ref_answers: list[str] | None = None
    llama_cpp = llamacpp.runtime_name()
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
        if ref_answers is None and llama_cpp and any(f == "gguf" for _, _, f in written):
            ref_answers = llamacpp.reference_answers(model, tokenizer, probes)  # the merged model's
        ms = ms_per_token(model, tokenizer, probes[: cfg.latency_prompts], cfg.latency_tokens)
        info = VariantInfo(name=name, path=rel, format=fmt, size_bytes=dir_size(out / rel),
                           load_seconds=round(load_s, 4), ms_per_token=round(ms, 3),
                           agreement=round(agree / max(total, 1), 6), probe_positions=total,
                           tokenizer_match=same_ids, runtime=RUNTIMES[_runtime_key(name)],
                           verified_by=["transformers"])
        del model
        if fmt == "gguf" and llama_cpp and ref_answers is not None:
            checked = llamacpp.check(out / rel, probes, ref_answers)
            info.verified_by.append(llama_cpp)
            info.answer_agreement = round(checked.agreement, 6)
            info.answer_prompts = len(probes)
            info.verify_error = checked.error
        infos.append(info)
    return infos


def _runtime_key(name: str) -> str:
    """RUNTIMES' key for a variant: nf4 runs bitsandbytes' bf16 kernel in eval mode where the CPU has AVX512-BF16."""
    if name.split("-")[0] == "nf4":
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
