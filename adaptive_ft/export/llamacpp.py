"""GGUF files answered by llama.cpp itself, through the optional ``llama-cpp-python`` bindings.

People run GGUF files in llama.cpp (and in Ollama and LM Studio, which embed it). A file that transformers'
GGUF loader reads back can still break there: a pre-tokenizer name llama.cpp does not know, special tokens it
does not parse as such, Q/K rows in the wrong rotary order, a missing end-of-generation token. So export loads
each GGUF file in llama.cpp, lets llama.cpp tokenize the chat-formatted probe prompts itself (special tokens
parsed, BOS as the file's metadata says), decodes greedily with llama.cpp's own greedy sampler (temperature 0,
stopping at what llama.cpp counts as end of generation) and compares each answer with the merged model's greedy
answer under transformers.

``llama-cpp-python`` is the ``gguf-check`` extra: ``scripts/setup.sh`` builds it from source, CPU only. Without
it the GGUF variants are checked by transformers' GGUF loader alone, and the manifest's ``verified_by`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaptive_ft.config import EvaluateConfig

# Answers are as long as evaluation decodes them by default: a label answer ends well inside it.
ANSWER_TOKENS = EvaluateConfig().max_new_tokens
INSTALL_HINT = "pip install 'adaptive-ft[gguf-check]' (scripts/setup.sh builds it)"


def version() -> str | None:
    """The installed llama-cpp-python version, or None where it is absent (or its library does not load)."""
    try:
        import llama_cpp  # deferred: an optional extra with a native library
    except (ImportError, OSError):
        return None
    return str(llama_cpp.__version__)


def runtime_name() -> str | None:
    """How the manifest names llama.cpp as a verifying runtime, or None where it is not installed."""
    v = version()
    return f"llama.cpp (llama-cpp-python {v})" if v else None


@dataclass
class Check:
    """One GGUF file run by llama.cpp on the probe prompts."""

    answers: list[str]
    agreement: float  # share of prompts whose answer equals the reference answer
    error: str = ""  # why llama.cpp could not load or run the file ("" when it did)


@torch.no_grad()
def reference_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[str],
                      max_new_tokens: int = ANSWER_TOKENS) -> list[str]:
    """Greedy answers under transformers, batch 1, to the model's end-of-sequence token or ``max_new_tokens``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False).strip())
    return out


def load(path: Path, n_threads: int | None = None) -> Any:
    """``llama_cpp.Llama`` for a GGUF file: CPU, the model's own context length, quiet."""
    from llama_cpp import Llama  # deferred: an optional extra with a native library

    threads = n_threads or torch.get_num_threads()
    return Llama(str(path), n_ctx=0, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, seed=0,
                 verbose=False)


def greedy_answers(llm: Any, prompts: list[str], max_new_tokens: int = ANSWER_TOKENS) -> list[str]:
    """llama.cpp's greedy answers: its tokenizer, its greedy sampler, its end-of-generation tokens."""
    import llama_cpp  # deferred: an optional extra with a native library

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    out = []
    for text in prompts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        llm.reset()  # a fresh context per prompt: no KV reuse from the previous prompt's shared prefix
        answer: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(answer) >= max_new_tokens:
                break
            answer.append(token)
        out.append(llm.detokenize(answer, special=False).decode("utf-8", errors="replace").strip())
    return out


def check(path: Path, prompts: list[str], reference: list[str], max_new_tokens: int = ANSWER_TOKENS) -> Check:
    """Run ``path`` in llama.cpp on ``prompts`` and compare its greedy answers with ``reference``."""
    try:
        llm = load(path)
    except (ValueError, RuntimeError, OSError) as e:  # llama-cpp-python raises ValueError when llama.cpp refuses
        return Check(answers=[], agreement=0.0, error=f"llama.cpp cannot load {path.name}: {e}")
    try:
        answers = greedy_answers(llm, prompts, max_new_tokens)
    except (ValueError, RuntimeError) as e:
        return Check(answers=[], agreement=0.0, error=f"llama.cpp failed running {path.name}: {e}")
    finally:
        llm.close()
    same = sum(a == b for a, b in zip(answers, reference))
    return Check(answers=answers, agreement=same / max(len(reference), 1))
