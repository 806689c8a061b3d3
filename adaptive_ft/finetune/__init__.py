"""Selective LoRA fine-tuning driven by the plan: ``train(cfg, store, plan, model, out) -> TrainResult``.

``data`` holds the split, prompt formatting, answer-only labels and weighted, length-grouped batches;
``train`` holds the loop (checkpoints, resume, early stopping, distillation, DDP).
"""

from adaptive_ft.finetune.data import format_prompt
from adaptive_ft.finetune.train import TrainResult, train

__all__ = ["TrainResult", "format_prompt", "train"]
