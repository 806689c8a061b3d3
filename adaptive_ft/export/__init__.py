"""Export: merge the LoRA adapter into its base and write deployable variants, each measured.

::

    from adaptive_ft.export import export
    result = export("runs/r1", "export/r1", ExportConfig(variants=["merged", "int8", "nf4", "gguf"]))

Variants (docs/contracts.md, "Export"):

- ``merged``: the base with ``W + (alpha/r) B A`` folded in, fp32 safetensors HF folder + tokenizer;
- ``int8`` / ``nf4``: the merged model quantized by bitsandbytes (LLM.int8() and 4-bit NormalFloat), saved as
  HF folders whose ``config.json`` carries the ``quantization_config``, so plain ``from_pretrained`` reloads them
  quantized (bitsandbytes 0.50 quantizes, saves and runs both on CPU: checked, and tested here); nf4 stores what
  bitsandbytes does not quantize (the embedding, tied to the output layer, and the norms) in bfloat16, which
  transformers reloads as such, so its residual stream runs in bf16 around the 4-bit layers;
- ``gguf-q8_0`` / ``gguf-f16``: GGUF files for llama.cpp-style runtimes (:mod:`adaptive_ft.export.gguf`).

Each variant is reloaded from disk and measured the same way: size on disk, load time, CPU milliseconds per
generated token (greedy), and top-1 next-token agreement with the merged model at every position of a fixed
probe set (the first ``probe_prompts`` test prompts of the run's split, formatted as training formatted them).
Each GGUF file is also run by llama.cpp itself where the ``gguf-check`` extra (llama-cpp-python) is installed
(:mod:`adaptive_ft.export.llamacpp`): its greedy answers on the probe prompts against the merged model's; the
manifest's ``verified_by`` names the runtime that checked each variant.
"""

from adaptive_ft.export.stage import (RUNTIMES, ExportResult, VariantInfo, dir_size, export, measure_variants,
                                      merge_adapter, ms_per_token, probe_prompts, quantize_bnb, top1_predictions)

__all__ = ["RUNTIMES", "ExportResult", "VariantInfo", "dir_size", "export", "measure_variants", "merge_adapter",
           "ms_per_token", "probe_prompts", "quantize_bnb", "top1_predictions"]
