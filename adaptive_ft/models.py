"""The documented import path of the model helpers (docs/contracts.md, "Models"), kept for scripts that use it.

The model layer itself is :mod:`adaptive_ft.lm.models`; this module only re-exports its public names.
"""

from adaptive_ft.lm.models import build_tiny_model, load_model, model_fingerprint, resolve_model

__all__ = ["build_tiny_model", "load_model", "model_fingerprint", "resolve_model"]
