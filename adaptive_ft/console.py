"""What a run prints: what a user can act on, not library noise or progress frames in a log file.

- bitsandbytes logs ``Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'``
  when it is imported on an AVX512-BF16 CPU: its optional ``kernels`` package would fetch a kernel from the Hub
  at run time, and without it bitsandbytes' own CPU kernel runs. There is nothing to act on, so that one record
  is dropped; every other bitsandbytes message still shows.
- Progress bars draw on a terminal only. tqdm bars here use ``disable=None`` (off when stderr is not a TTY) and the
  long stages print a plain line instead; the bars transformers and huggingface_hub draw (loading weights,
  converting GGUF tensors) are switched off the same way, unless ``HF_HUB_DISABLE_PROGRESS_BARS`` is set.
- transformers 5 warns that ``is_gradient_checkpointing`` is deprecated whenever peft reads that property (on every
  adapter load and merge): the call is peft's, not the user's, so that one FutureWarning is not shown.

:func:`install` runs when :mod:`adaptive_ft` is imported, before anything imports bitsandbytes.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import IO

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
GRADIENT_CHECKPOINTING_WARNING = "`is_gradient_checkpointing` is deprecated"


class DropMessage(logging.Filter):
    """Drops the records whose message (the format string, before arguments) starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def interactive(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default stderr, where progress goes) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def install() -> None:
    """Drop bitsandbytes' kernels-community record and peft's deprecated-property warning; no library progress bars
    when stderr is not a terminal."""
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_WARNING, category=FutureWarning)
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, DropMessage) and f.prefix == BNB_KERNELS_MESSAGE for f in logger.filters):
        logger.addFilter(DropMessage(BNB_KERNELS_MESSAGE))
    if not interactive() and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub, and so transformers, at import
        if "huggingface_hub" in sys.modules:  # imported before us: its setting is read already
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
