"""Write a Llama-architecture model as a GGUF file (llama.cpp's format) with the ``gguf`` package.

What llama.cpp-style runtimes expect, and what transformers' own GGUF loader reads back:

- tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ...), taken from ``gguf``'s own
  HF-name -> GGUF-name table (``gguf.get_tensor_name_map``), 2-D weights in Q8_0 or F16, norms in F32;
- the Q and K projections with their rows re-ordered per head: HF's rotary embedding rotates dimension ``i``
  with ``i + d/2`` (``rotate_half``), llama.cpp's with ``2i`` and ``2i + 1``. Interleaving the two halves of
  each head makes the two equivalent; transformers' loader undoes exactly this when it reads the file;
- the hyper-parameters under ``llama.*`` keys, and the tokenizer (byte-level BPE as ``gpt2``: tokens, merges,
  token types, special ids) plus the chat template under ``tokenizer.*`` keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive_ft.errors import ModelError

QTYPES = {"q8_0": "Q8_0", "f16": "F16"}
FILE_TYPES = {"q8_0": "MOSTLY_Q8_0", "f16": "MOSTLY_F16"}


def interleave_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """(n_heads * d, in) with halves ``[x_0..x_{d/2-1} | y_0..]`` per head -> rows ``x_0, y_0, x_1, y_1 ...``."""
    rows = weight.shape[0]
    d = rows // n_heads
    return weight.reshape(n_heads, 2, d // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: Path, qtype: str = "q8_0", name: str = "model") -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``) and ``tokenizer`` to ``path`` with 2-D weights in ``qtype``."""
    import gguf

    cfg = model.config
    if cfg.model_type not in ("llama",):
        raise ModelError(f"GGUF export supports the llama architecture (SmolLM2, Llama...), not {cfg.model_type!r}; "
                         "export without the gguf variant")
    if qtype not in QTYPES:
        raise ModelError(f"GGUF type {qtype!r}: use one of {sorted(QTYPES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_hparams(writer, cfg, name, gguf.LlamaFileType[FILE_TYPES[qtype]])
    _write_tokenizer(writer, tokenizer, cfg.vocab_size, name)
    _write_tensors(writer, model, cfg, gguf.GGMLQuantizationType[QTYPES[qtype]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ModelError(f"GGUF export: rope scaling {rope_type!r} is not written yet; export without gguf")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _write_hparams(writer: Any, cfg: Any, name: str, file_type: int) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(int(file_type))


def _write_tensors(writer: Any, model: torch.nn.Module, cfg: Any, qtype: Any) -> None:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp (and transformers' loader) reuse token_embd when output is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = interleave_rope_rows(data, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = interleave_rope_rows(data, cfg.num_key_value_heads)
        _add_tensor(writer, gguf_name, data, qtype)


def _add_tensor(writer: Any, name: str, data: np.ndarray, qtype: Any) -> None:
    """Norms stay F32 (as llama.cpp keeps them); Q8_0 needs rows that are whole 32-value blocks, else F16."""
    import gguf

    if data.ndim < 2:
        writer.add_tensor(name, data.astype(np.float32))
        return
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == gguf.GGMLQuantizationType.F16 or data.shape[-1] % block:
        writer.add_tensor(name, data.astype(np.float16))
        return
    writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def tokenizer_tables(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, merges) of a byte-level BPE fast tokenizer, padded to ``vocab_size``."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ModelError("GGUF export writes byte-level BPE tokenizers (GPT-2 / SmolLM2 style); this one is "
                         f"{model.get('type')!r}. Export without the gguf variant.")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    size = max(vocab_size, max(by_id) + 1)
    tokens, token_types = [], []
    for i in range(size):
        # Ids the model has rows for but the tokenizer never emits: llama.cpp's converter names them [PADi].
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, int(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, token_types, merges


def _write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, model_name: str) -> None:
    tokens, token_types, merges = tokenizer_tables(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    name = f"{model_name} {getattr(tokenizer, 'name_or_path', '') or ''}".lower()
    # llama.cpp picks its pre-tokenizer split regex by this name; SmolLM2 has its own entry.
    writer.add_tokenizer_pre("smollm" if "smollm" in name else "gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(int(tid))
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
