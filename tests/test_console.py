"""What reaches the console: bitsandbytes' un-actionable kernels-community record is dropped (and only it), and
progress bars draw only on a terminal."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from adaptive_ft import console


def _records(logger: logging.Logger, *messages: str) -> list[str]:
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        for m in messages:
            logger.warning(m, "No module named 'kernels'")
    finally:
        logger.removeHandler(handler)
    return seen


def test_only_the_kernels_community_record_is_dropped():
    logger = logging.getLogger(console.BNB_CPU_LOGGER)
    console.install()  # idempotent: importing adaptive_ft ran it already
    assert sum(isinstance(f, console.DropMessage) for f in logger.filters) == 1
    seen = _records(logger, console.BNB_KERNELS_MESSAGE + ": %s. Please make sure you already `pip install kernels`",
                    "Some other bitsandbytes CPU warning: %s")
    assert seen == ["Some other bitsandbytes CPU warning: No module named 'kernels'"]


def test_the_filter_matches_what_bitsandbytes_logs():
    """If a new bitsandbytes (a lock refresh) rewords or moves the message, this says so."""
    import bitsandbytes

    ops = Path(bitsandbytes.__file__).parent / "backends" / "cpu" / "ops.py"
    source = ops.read_text()
    assert f'"{console.BNB_KERNELS_MESSAGE}: %s.' in source and "logger = logging.getLogger(__name__)" in source
    assert console.BNB_CPU_LOGGER == "bitsandbytes.backends.cpu.ops"


@pytest.mark.parametrize("first", ["import adaptive_ft.export", ""])
def test_importing_bitsandbytes_after_adaptive_ft_prints_nothing(first):
    from bitsandbytes.functional import has_avx512bf16

    code = f"{first}\nimport bitsandbytes\nfrom transformers import AutoModelForCausalLM"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stderr
    if first:
        assert "kernels-community" not in err, err
    elif has_avx512bf16():  # the CPUs where bitsandbytes logs it: without adaptive_ft first, it shows
        assert console.BNB_KERNELS_MESSAGE in err, err


def test_interactive_is_false_for_files_and_pipes(tmp_path):
    assert not console.interactive(io.StringIO())
    with open(tmp_path / "log.txt", "w") as f:
        assert not console.interactive(f)
    closed = io.StringIO()
    closed.close()
    assert not console.interactive(closed)


def test_peft_reading_the_deprecated_checkpointing_property_prints_nothing():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` on every adapter load and merge; the user
    cannot act on it, so the warning is filtered (and only that one)."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")  # what a fresh interpreter shows ...
        console.install()  # ... once adaptive_ft is imported
        assert model.is_gradient_checkpointing is False
        warnings.warn("another FutureWarning", FutureWarning)
    assert [str(w.message) for w in shown] == ["another FutureWarning"]
