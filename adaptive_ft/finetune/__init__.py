"""Selective LoRA fine-tuning driven by the plan: ``train(cfg, store, plan, model, out) -> TrainResult``.

:mod:`.data` holds the split, weighted sampling and length-grouped batches; :mod:`.trainer` holds the loop
(checkpoints, resume, early stopping, distillation, DDP). Prompt formatting and answer-only labels are the
model layer's (:mod:`adaptive_ft.lm.tokens`), shared with the layer probe and evaluation.
"""

from adaptive_ft.finetune.trainer import TrainResult, train

__all__ = ["TrainResult", "train"]
