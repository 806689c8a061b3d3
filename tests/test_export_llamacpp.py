"""GGUF answered by llama.cpp itself: each GGUF export of a tiny label model, loaded by llama.cpp (through
llama-cpp-python, the ``gguf-check`` extra scripts/setup.sh builds), gives the merged model's greedy answers.

The oracle here is independent of the export's own check (:mod:`adaptive_ft.export.llamacpp`, which uses
llama.cpp's greedy sampler): it evaluates with llama.cpp token by token and takes the argmax of llama.cpp's own
logits, and it compares llama.cpp's tokenization of every probe prompt with the merged tokenizer's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptive_ft.config import ExportConfig
from adaptive_ft.export import export, probe_prompts
from adaptive_ft.export import llamacpp
from adaptive_ft.lm.tokens import format_for_model

from ship_helpers import TEXTS, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.slow

ANSWER_TOKENS = 16
# Ten request kinds, four intents: the label each prompt of a kind should get.
KIND_LABEL = ["card charged", "password", "transfer", "card declined", "refund", "pin", "exchange rate", "fee",
              "activate card", "top up"]
LABELS = sorted(set(KIND_LABEL))
OPENERS = ["", "hi, ", "please help: ", "urgent - ", "question: ", "hello, "]
FIT_STEPS = 150


@pytest.fixture(scope="module")
def llama_cpp_module():
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        if os.environ.get("ADAPTIVE_FT_SKIP_LLAMA_CPP") == "1":
            pytest.skip("llama-cpp-python left out on purpose (ADAPTIVE_FT_SKIP_LLAMA_CPP=1)")
        pytest.fail(f"llama-cpp-python is not installed ({e}); scripts/setup.sh builds it ({llamacpp.INSTALL_HINT})")
    return llama_cpp


def _label_examples() -> list[tuple[str, str]]:
    texts = list(dict.fromkeys(TEXTS))
    return [(opener + text, KIND_LABEL[k]) for opener in OPENERS for k, text in enumerate(texts)]


def _label_run(root: Path, seed: int = 0) -> Path:
    """A RUN whose base was fitted to answer each prompt with its label, with a small non-zero LoRA on top:
    greedy answers are labels, decided by clear margins (as a fine-tuned model's are)."""
    import polars as pl
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    examples = _label_examples()
    prompts = [format_for_model(tok, p) for p, _ in examples]  # as training and the export's probes format them
    rows = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    answers = [tok(label, add_special_tokens=False).input_ids + [tok.eos_token_id] for _, label in examples]
    width = max(len(r) + len(a) for r, a in zip(rows, answers))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, a) in enumerate(zip(rows, answers)):
        ids[i, : len(r) + len(a)] = torch.tensor(r + a)
        labels[i, len(r): len(r) + len(a)] = torch.tensor(a)
        mask[i, : len(r) + len(a)] = 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(FIT_STEPS):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    base_dir = root / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    run = root / "run"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(run / "adapter")
    (run / "manifest.json").write_text(json.dumps({"base_model": str(base_dir), "base_model_path": str(base_dir),
                                                   "task": "label", "seed": seed}))
    pl.DataFrame([{"example_id": f"e{i:03d}", "domain": "banking", "split": "test", "prompt": p,
                   "reference": label} for i, (p, label) in enumerate(examples)]).write_parquet(run / "split.parquet")
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, llama_cpp_module):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("llamacpp")
    run = _label_run(root)
    n = len(_label_examples())
    result = export(run, root / "export", ExportConfig(variants=["merged", "gguf"], probe_prompts=n,
                                                       latency_prompts=1, latency_tokens=2))
    return run, result


def _merged(result):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = result.out / "merged"
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def _hf_answer_ids(model, tok, prompt: str) -> list[int]:
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                         do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    return gen[: gen.index(tok.eos_token_id)] if tok.eos_token_id in gen else gen


def _llama_argmax_answer_ids(llm, prompt_ids: list[int], eos: int) -> list[int]:
    """Greedy by hand: llama.cpp evaluates, the answer is the argmax of its own logits, one token at a time."""
    llm.reset()
    llm.eval(prompt_ids)
    out: list[int] = []
    while len(out) < ANSWER_TOKENS:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return out


@pytest.mark.parametrize("qtype,required", [("f16", 1.0), ("q8_0", 0.95)])
def test_llama_cpp_answers_the_probe_prompts_as_the_merged_model_does(exported, llama_cpp_module, qtype, required):
    run, result = exported
    merged, tok = _merged(result)
    probes = probe_prompts(run, tok, len(_label_examples()), json.loads((run / "manifest.json").read_text()))
    assert len(probes) == len(_label_examples()) == 60
    llm = llama_cpp_module.Llama(str(result.out / f"model-{qtype}.gguf"), n_ctx=256, n_threads=1, logits_all=True,
                                 seed=0, verbose=False)
    try:
        # What llama.cpp read from the file: the merged tokenizer's special ids and chat template.
        assert (llm.token_bos(), llm.token_eos()) == (tok.bos_token_id, tok.eos_token_id)
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        same = 0
        for prompt in probes:
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            assert ids == tok(prompt, add_special_tokens=False).input_ids, prompt  # llama.cpp's own tokenizer
            ours = _llama_argmax_answer_ids(llm, ids, tok.eos_token_id)
            same += ours == _hf_answer_ids(merged, tok, prompt)
    finally:
        llm.close()
    # Label prompts: the merged model answers them with labels (else this would not test label answers).
    merged_answers = [tok.decode(_hf_answer_ids(merged, tok, p)) for p in probes]
    assert sum(a in LABELS for a in merged_answers) >= 0.9 * len(probes), merged_answers
    assert same / len(probes) >= required, (qtype, same, len(probes))
    # The manifest records llama.cpp as a runtime that verified this file, and the figure it measured with
    # llama.cpp's greedy sampler, which agrees with greedy by hand.
    info = {v.name: v for v in result.variants}[f"gguf-{qtype}"]
    assert info.verified_by == ["transformers", llamacpp.runtime_name()] and info.verify_error == ""
    assert info.answer_prompts == len(probes) and info.answer_agreement == round(same / len(probes), 6)
    on_disk = {v["name"]: v for v in json.loads(result.manifest_path.read_text())["variants"]}[f"gguf-{qtype}"]
    assert on_disk["verified_by"][1].startswith("llama.cpp (llama-cpp-python ")


def test_merged_is_verified_by_transformers_only(exported):
    _, result = exported
    merged = {v.name: v for v in result.variants}["merged"]
    assert merged.verified_by == ["transformers"] and merged.answer_agreement is None


def test_a_file_llama_cpp_cannot_load_is_reported_not_raised(exported, tmp_path):
    _, result = exported
    data = (result.out / "model-q8_0.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    checked = llamacpp.check(cut, ["hello"], ["x"])
    assert checked.agreement == 0.0 and "llama.cpp cannot load cut.gguf" in checked.error


def test_without_llama_cpp_the_manifest_says_transformers_alone_verified_it(exported, tmp_path, monkeypatch):
    run, _ = exported
    monkeypatch.setattr(llamacpp, "runtime_name", lambda: None)
    result = export(run, tmp_path / "ex", ExportConfig(variants=["gguf"], gguf_types=["q8_0"], probe_prompts=2,
                                                       latency_prompts=1, latency_tokens=2))
    (info,) = result.variants
    assert info.name == "gguf-q8_0" and info.verified_by == ["transformers"] and info.answer_agreement is None
