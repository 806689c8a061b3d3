"""adaptive-ft: decide from real usage what to fine-tune, fine-tune exactly that, ship it quantized, prove it helped."""

__version__ = "0.1.0"
