"""adaptive-ft: decide from real usage what to fine-tune, fine-tune exactly that, ship it quantized, prove it helped."""

from adaptive_ft import console as _console

__version__ = "0.1.0"

_console.install()  # before anything imports bitsandbytes (see adaptive_ft/console.py)
