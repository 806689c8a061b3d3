"""A tiny train RUN built in-process, for the export / evaluate / review tests.

It follows the ``RUN/`` contract in docs/contracts.md: a Llama base (2 layers, hidden 64) with a byte-level
BPE tokenizer and a chat template, a peft LoRA adapter whose B matrices are random and non-zero (so merging
really changes the weights), ``manifest.json`` and ``split.parquet``.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "my card was charged twice", "how do I reset my password", "the transfer has not arrived",
    "card payment declined", "refund for a cancelled order", "change my pin", "exchange rate for euros",
    "why is there a fee on my statement", "activate my new card", "top up by bank transfer",
] * 20


def tiny_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style, like SmolLM2's) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(tok) -> torch.nn.Module:
    """A random 2-layer, 64-wide Llama for ``tok`` (tied embeddings, as SmolLM2's), from the current torch seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, rope_theta=10000.0)
    return LlamaForCausalLM(cfg)


def tiny_base(out: Path, seed: int = 0) -> Path:
    """Save a random tiny Llama + tokenizer to ``out`` (an ordinary HF folder)."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    _fit(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _fit(model, tok, steps: int = 40) -> None:
    """A few Adam steps on the chat-formatted sentences, so the model is confident like a trained one: top-1
    agreement then measures the export and not ties between the near-equal logits of random weights."""
    texts = [tok.apply_chat_template([{"role": "user", "content": t}, {"role": "assistant", "content": t}],
                                     tokenize=False) for t in TEXTS[:10]]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def tiny_run(root: Path, task: str = "label", seed: int = 0) -> Path:
    """A RUN folder: base + LoRA adapter with non-zero B + manifest.json + split.parquet."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tiny_base(root / "base", seed)
    run = root / "run"
    run.mkdir(parents=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                        "o_proj", "up_proj"]))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(run / "adapter")
    manifest = {"base_model": str(base_dir), "base_model_path": str(base_dir), "task": task, "seed": seed}
    (run / "manifest.json").write_text(json.dumps(manifest))
    split_frame().write_parquet(run / "split.parquet")
    return run


def split_frame() -> pl.DataFrame:
    """12 examples over 2 domains (cards / transfers): e0..e5 test, e6, e7 val, e8..e11 train."""
    rows = []
    labels = {"cards": ["card_arrival", "card_declined"], "transfers": ["transfer_pending", "exchange_rate"]}
    for i in range(12):
        domain = "cards" if i % 2 == 0 else "transfers"
        split = "test" if i < 6 else ("val" if i < 8 else "train")
        rows.append({"example_id": f"e{i}", "domain": domain, "split": split, "prompt": TEXTS[i % 10],
                     "reference": labels[domain][i // 2 % 2]})
    return pl.DataFrame(rows)
