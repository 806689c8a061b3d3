"""Loading whatever the ship stages are pointed at: a train RUN, an HF folder (merged / int8 / nf4), a GGUF file.

Export and evaluation share this so a model is loaded — and its prompts formatted — the same way in both.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import logging

import torch

from adaptive_ft.errors import InputError, ModelError, read_json

# bitsandbytes logs "MatMul8bitLt: inputs will be cast ..." on every int8 matmul on CPU: thousands of lines
# during an evaluation that say nothing new.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def read_run(run: Path) -> dict[str, Any]:
    """``RUN/manifest.json`` with ``base_model_path`` resolved (docs/contracts.md, "Train run")."""
    path = Path(run) / "manifest.json"
    manifest = read_json(path, f"{run}: no manifest.json; pass the folder `adaptive-ft train --out` wrote",
                         hint="; was the train run interrupted while writing it?")
    base_path = manifest.get("base_model_path")
    if not base_path or not Path(base_path).exists():
        spec = manifest.get("base_model")
        if not spec:
            raise InputError(f"{path}: neither base_model_path nor base_model is set")
        from adaptive_ft.models import resolve_model

        manifest["base_model_path"] = str(resolve_model(spec))
    return manifest


def is_run(path: Path) -> bool:
    """A train run folder: a manifest and an adapter."""
    return (path / "manifest.json").is_file() and (path / "adapter").is_dir()


def load_any(spec: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode for a RUN folder (base + adapter), an HF folder or a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if not path.exists():
        raise InputError(f"{spec}: no such model folder or file (expected a RUN, EXPORT/<variant> or .gguf)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if path.is_file() and path.suffix == ".gguf":
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            elif is_run(path):
                return load_run(path, dtype)
            else:
                quantized = (path / "config.json").is_file() and "quantization_config" in (path / "config.json").read_text()
                extra = {"device_map": "cpu"} if quantized else {}
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
                tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{spec}: cannot be loaded as a causal LM: {e}") from e
    return model.eval(), _with_pad(tokenizer)


def load_run(run: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """The run's base with its adapter attached (not merged: what training evaluated)."""
    from peft import PeftModel

    manifest = read_run(run)
    base, tokenizer = load_any(manifest["base_model_path"], dtype)
    return PeftModel.from_pretrained(base, run / "adapter").eval(), tokenizer


def _with_pad(tokenizer: Any) -> Any:
    """The same defaults ``models.load_model`` gives the tokenizer training used: a pad token, a chat template."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        from adaptive_ft.models import CHATML_TEMPLATE

        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def format_for_model(tokenizer: Any, prompt: str, manifest: dict[str, Any] | None = None) -> str:
    """The prompt as training formatted it: ``finetune.data.format_prompt`` (chat template + generation prompt),
    with the system turn the run recorded in its manifest (``system_prompt``), so evaluation asks what training taught.
    """
    try:
        from adaptive_ft.finetune.data import format_prompt
    except ImportError:  # the train stage is not installed in this checkout yet: the same rule, inline
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        return prompt
    if manifest is not None and "system_prompt" in manifest:
        return format_prompt(tokenizer, prompt, system=manifest["system_prompt"])
    return format_prompt(tokenizer, prompt)
