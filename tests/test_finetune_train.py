"""adaptive_ft.finetune.trainer on a tiny Llama built in-process: what changes, where, and what a run leaves behind."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from adaptive_ft.artifacts import run as run_art
from adaptive_ft.config import load_config
from adaptive_ft.errors import PlanError, TrainingError
from adaptive_ft.lm import tokens as tk
from adaptive_ft.lm.models import load_model

# The package exports the function train(), which shadows the submodule's name as an attribute.
T = importlib.import_module("adaptive_ft.finetune.trainer")
INTENTS = ["card", "transfer", "refund", "pin", "atm", "cash"]


def _examples(n: int = 180) -> pl.DataFrame:
    rows = []
    for i in range(n):
        word = INTENTS[i % len(INTENTS)]
        rows.append({"example_id": f"e{i:04d}", "domain": "cards" if i % 2 else "money",
                     "prompt": f"question {i % 11} about my {word} please", "reference": f"{word}_intent"})
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def examples() -> pl.DataFrame:
    return _examples()


@pytest.fixture(scope="module")
def tiny(tiny_model, examples: pl.DataFrame) -> Path:
    torch.set_num_threads(1)
    texts = list(examples["prompt"]) + list(examples["reference"])
    return tiny_model(texts=texts, n_layers=3, hidden=64)


def _plan(path: Path, layers: list[int] | None = None, **extra) -> Path:
    doc = {"domains": ["cards", "money"], **extra}
    if layers is not None:
        doc["layers"] = {"selected": layers, **extra.pop("layer_extra", {})}
    path.write_text(json.dumps(doc))
    return path


def _cfg(*overrides: str):
    base = ["train.max_steps=12", "train.batch_size=8", "train.lr=0.01", "train.warmup_steps=2",
            "train.eval_every=4", "train.checkpoint_every=4", "train.lora.r=4", "train.lora.alpha=8",
            "train.max_seq_len=64", "train.threads=1", "train.patience=0"]
    return load_config(None, [*base, *overrides])


# --------------------------------------------------------------------------------------------- the step


def test_only_adapter_weights_change_and_loss_is_on_answer_tokens_only(tiny: Path, examples: pl.DataFrame) -> None:
    base, tok = load_model(tiny)
    tc = _cfg().train
    model = T.attach_lora(base, tc, [0, 1, 2], {})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    ctx = T.Ctx(model, torch.optim.AdamW(params, lr=0.01), None, tc, T.Dist(), tok.pad_token_id)
    ctx.sched = torch.optim.lr_scheduler.LambdaLR(ctx.opt, lambda s: 1.0)
    enc = tk.encode_all(tok, examples.head(8), 64)

    # The answer-only loss equals the standard masked loss (labels -100 on prompt and padding).
    b = tk.collate(enc, tok.pad_token_id)
    labels = torch.full_like(b["input_ids"], -100)
    for i, e in enumerate(enc):
        labels[i, e.n_prompt:len(e.ids)] = torch.tensor(e.ids[e.n_prompt:])
    with torch.no_grad():
        ours = F.cross_entropy(tk.answer_logits(model, b["input_ids"], b["predict_pos"]), b["targets"])
        hf = model(input_ids=b["input_ids"], labels=labels).loss
    assert ours.item() == pytest.approx(hf.item(), rel=1e-5)

    for _ in range(3):
        T.train_step(ctx, [enc], params)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapter now does something


def test_bf16_autocast_only_where_the_cpu_multiplies_bf16_and_the_step_runs_in_it(tiny, examples, tmp_path,
                                                                                  monkeypatch) -> None:
    assert T.native_bf16("flags : fpu avx2 avx512f avx512_bf16 avx512_vnni") and T.native_bf16("flags : amx_bf16")
    assert not T.native_bf16("flags : fpu avx2 avx512f avx512_vnni") and not T.native_bf16("flags : xavx512_bf16x")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for native, want in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(T, "native_bf16", lambda cpuinfo=None, native=native: native)
        assert T.autocast_dtype(_cfg().train, cpu) is want and T.autocast_dtype(_cfg().train, gpu) is None  # auto
    assert T.autocast_dtype(_cfg("train.precision=fp32").train, cpu) is None
    assert T.autocast_dtype(_cfg("train.precision=bf16").train, cpu) is torch.bfloat16
    seen = []
    logits = tk.answer_logits
    monkeypatch.setattr(T.tk, "answer_logits", lambda *a: seen.append((out := logits(*a)).dtype) or out)
    plan = _plan(tmp_path / "plan.json")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen.clear()
        r = T.train(_cfg(f"train.precision={precision}"), None, plan, str(tiny), tmp_path / precision,
                    examples=examples)
        manifest = json.loads((tmp_path / precision / "manifest.json").read_text())
        assert manifest["precision"] == precision and dtype in seen  # the training forwards ran in it
        assert seen.count(torch.float32) >= 3  # validation stays fp32 (3 validations)
        assert r.metrics[-1]["val_loss"] < r.metrics[3]["val_loss"]  # and it learns


def test_frozen_base_cast_once_gives_autocast_s_own_forward_and_fp32_outside_it(tiny, examples, tmp_path,
                                                                                monkeypatch) -> None:
    """The bf16 copies of the frozen Linear weights are what autocast forwards use, bit-for-bit autocast's cast."""
    base, tok = load_model(tiny)
    torch.manual_seed(0)
    model = T.attach_lora(base, _cfg().train, [0, 1, 2], {})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    T.fuse_lora(model)
    model.eval()
    ids = torch.tensor([tok("question 3 about my card please card_intent").input_ids])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits
    fp32 = model(input_ids=ids).logits
    # every frozen Linear: 7 base layers in each of 3 layers, and the output layer; no adapter weight
    assert T.keep_frozen_casts(model, torch.bfloat16) == 3 * 7 + 1
    casts = [m for m in model.modules() if hasattr(m, "autocast_weight")]
    assert all(m.autocast_weight.dtype == torch.bfloat16 and m.weight.dtype == torch.float32 for m in casts)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(input_ids=ids).logits
    assert torch.equal(got, want)  # the same forward as autocast's own casts
    assert torch.equal(model(input_ids=ids).logits, fp32)  # outside autocast: the fp32 weights
    with torch.no_grad():
        for m in casts:
            m.autocast_weight.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.allclose(model(input_ids=ids).logits.float(), want.float(), atol=1e-2)  # copies are used
    calls = []
    real = T.keep_frozen_casts
    monkeypatch.setattr(T, "keep_frozen_casts", lambda m, d: calls.append(d) or real(m, d))
    plan = _plan(tmp_path / "plan.json")
    for precision in ("bf16", "fp32"):
        T.train(_cfg(f"train.precision={precision}", "train.max_steps=2"), None, plan, str(tiny), tmp_path / precision,
                examples=examples)
    assert calls == [torch.bfloat16]  # a bf16 run keeps the casts; an fp32 run has none to keep


def _assert_same_function_and_adapter_gradients(ref, other, tok) -> None:
    """``other`` (a rewritten forward) gives ``ref``'s logits and adapter gradients in eval mode, and the adapters
    count (the logits differ with them disabled)."""
    ids = torch.tensor([tok("question 3 about my card please card_intent").input_ids])
    for m in (ref, other):
        m.eval()
        m(input_ids=ids).logits.square().mean().backward()
    a, b = ref(input_ids=ids).logits, other(input_ids=ids).logits
    with other.disable_adapter():
        plain = other(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(b, plain, atol=1e-3)
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert grads and all(torch.allclose(p.grad, grads[n], atol=1e-5) for n, p in other.named_parameters() if n in grads)


def test_lora_groups_compute_siblings_on_one_input_as_one_and_equal_the_fused_layers(tiny, examples, tmp_path,
                                                                                     monkeypatch) -> None:
    import copy

    base, tok = load_model(tiny)
    torch.manual_seed(0)
    model = T.attach_lora(base, _cfg("train.lora.dropout=0.5").train, [0, 1, 2], {})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    T.fuse_lora(model)
    grouped = copy.deepcopy(model)
    groups = T.group_lora(grouped)
    assert sorted(len(g.members) for g in groups) == [2] * 3 + [3] * 3  # q/k/v and gate/up in each layer
    for m in (model, grouped):  # each member keeps its own scaling
        next(x for n, x in m.named_modules() if n.endswith("layers.1.self_attn.k_proj")).scaling["default"] *= 3
    _assert_same_function_and_adapter_gradients(model, grouped, tok)
    g = next(g for g in groups if len(g.members) == 3)
    storage = g.base.weight.untyped_storage().data_ptr()
    assert all(m.base_layer.weight.untyped_storage().data_ptr() == storage for m in g.members)  # one copy
    q, k, _ = g.members
    x = torch.randn(5, 64)
    with torch.no_grad():
        q(x)  # computes k's output too
        k.lora_B["default"].weight.add_(1.0)  # as an optimizer step would: what q's call kept for k is stale
        assert torch.allclose(k(x), T._fused_lora_forward(k, x), atol=1e-5)
        exact = k(x)
        for m in g.members:
            m.train()
        draws = torch.stack([k(x) for _ in range(2000)])
        masks = []
        real_mask = T.dropout_mask

        def recorded_mask(*args):
            keep, p = real_mask(*args)
            masks.append(keep)
            return keep, p

        monkeypatch.setattr(T, "dropout_mask", recorded_mask)
        q.lora_B["default"].weight.add_(1.0)  # a new state: the call below computes the group afresh
        q(x)
        monkeypatch.setattr(T, "dropout_mask", real_mask)
    spread = draws.std(0).mean()
    assert spread > 1e-2 and (draws.mean(0) - exact).abs().mean() < 0.1 * spread  # dropout, unbiased
    assert len(masks) == 1  # one mask for the group's shared input, as loralib's MergedLinear draws for q/k/v
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):  # counts casts of a tensor shaped like x
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == tuple(x.shape):
                Casts.n += 1
            return func(*args, **(kwargs or {}))

    o = next(m for n, m in grouped.named_modules() if n.endswith("layers.1.self_attn.o_proj"))
    for layer in (q, o):  # a group, and a layer on its own: the input is cast once for base and adapter
        Casts.n = 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Casts():
            layer(x)
        assert Casts.n == 1
    calls = []
    real = T.group_lora
    monkeypatch.setattr(T, "group_lora", lambda m: calls.append(len(out := real(m))) or out)
    T.train(_cfg("train.max_steps=2"), None, _plan(tmp_path / "plan.json"), str(tiny), tmp_path / "run",
            examples=examples)
    assert calls == [6]  # a run trains through the groups


def test_cpu_dropout_masks_drop_at_p_and_follow_torch_s_seed() -> None:
    cpu = torch.device("cpu")
    keep, p = T.dropout_mask((400, 1000), 0.05, cpu)
    assert keep.dtype == torch.bool and keep.shape == (400, 1000)
    assert abs(p - 0.05) <= 0.5 / T.MASK_LEVELS
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / keep.numel()) ** 0.5  # drops at p (4 s.e.)
    assert not torch.equal(keep, T.dropout_mask((400, 1000), 0.05, cpu)[0])  # a fresh mask each call
    torch.manual_seed(3)
    a = T.dropout_mask((50, 70), 0.5, cpu)[0]
    torch.manual_seed(3)
    assert torch.equal(a, T.dropout_mask((50, 70), 0.5, cpu)[0])  # torch's seed decides it
    keep, p = T.dropout_mask((100, 100), 1e-6, cpu)  # rounds to 0: nothing dropped, and it says so
    assert p == 0.0 and bool(keep.all())


def test_cpu_dropout_masks_come_in_the_dtype_of_the_input_they_multiply(tiny, monkeypatch) -> None:
    """A boolean mask is converted by the product and again by its backward (two passes over the
    activations, inside the kernel); the layers draw the mask in the input's dtype instead."""
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(5)
        keep, p = T.dropout_mask((60, 70), 0.3, cpu)
        torch.manual_seed(5)
        typed, q = T.dropout_mask((60, 70), 0.3, cpu, dtype)
        assert typed.dtype == dtype and q == p
        assert torch.equal(typed, keep.to(dtype))  # the same mask, as 0.0 / 1.0
    base, _ = load_model(tiny)
    model = T.attach_lora(base, _cfg("train.lora.dropout=0.2").train, [0, 1, 2], {})
    T.fuse_lora(model)
    model.train()
    groups = T.group_lora(model)
    o = next(m for n, m in model.named_modules() if n.endswith("layers.1.self_attn.o_proj"))
    masks = []
    real = T.dropout_mask

    def recorded(*args):
        keep, p = real(*args)
        masks.append(keep.dtype)
        return keep, p

    monkeypatch.setattr(T, "dropout_mask", recorded)
    for layer in (groups[0].members[0], o):  # a group and a lone layer, in fp32 and under bf16 autocast
        for amp, want in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
            masks.clear()
            x = torch.randn(2, 5, 64, requires_grad=True)
            with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
                out = layer(x)
            out.float().sum().backward()
            assert masks == [want] and x.grad is not None


def test_cpu_optimizer_is_torch_s_fused_adamw_and_steps_as_the_plain_one(tiny, examples, tmp_path,
                                                                         monkeypatch) -> None:
    tc = _cfg("train.weight_decay=0.1").train
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(8, 64)) for _ in range(3)]
    b = [torch.nn.Parameter(t.detach().clone()) for t in a]
    start = [t.detach().clone() for t in a]
    fused = T.make_optimizer(a, tc, torch.device("cpu"))
    plain = torch.optim.AdamW(b, lr=tc.lr, weight_decay=tc.weight_decay)
    assert fused.defaults["fused"] is True and fused.defaults["lr"] == tc.lr
    for _ in range(3):
        for ps, opt in ((a, fused), (b, plain)):
            for i, q in enumerate(ps):
                q.grad = torch.full_like(q, 0.1 * (i + 1)) + q.detach() ** 2
            opt.step()
    for x, y, x0 in zip(a, b, start):
        assert torch.allclose(x, y, atol=1e-6) and (x - x0).abs().min() > 1e-3  # the same update, which moved
    made = []
    real = T.make_optimizer
    monkeypatch.setattr(T, "make_optimizer", lambda *args: made.append(real(*args)) or made[-1])
    T.train(_cfg("train.max_steps=1"), None, _plan(tmp_path / "plan.json"), str(tiny), tmp_path / "run",
            examples=examples)
    assert len(made) == 1 and made[0].defaults["fused"] is True  # a run steps with it


def test_bf16_forward_on_a_cpu_takes_the_math_attention_kernel() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(4, 3, 40, 32, dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        math = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.equal(math, flash)  # the two kernels are told apart by their rounding
    for amp, want in ((torch.bfloat16, math), (None, flash)):
        ctx = T.Ctx(None, None, None, _cfg().train, T.Dist(), 0, amp=amp)
        with ctx.forward():
            assert torch.equal(F.scaled_dot_product_attention(q, k, v, is_causal=True), want)
            assert torch.backends.cuda.flash_sdp_enabled() is (amp is None)


def test_fused_lora_forward_is_peft_s_function_and_its_dropout_is_unbiased(tiny) -> None:
    """Outputs and adapter gradients equal peft's own forward; under dropout the mean output is the same."""
    import copy

    base, tok = load_model(tiny)
    torch.manual_seed(0)
    peft_model = T.attach_lora(base, _cfg("train.lora.dropout=0.5").train, [0, 1, 2], {"1": 8})
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    fused = copy.deepcopy(peft_model)
    assert T.fuse_lora(fused) == 3 * 7
    _assert_same_function_and_adapter_gradients(peft_model, fused, tok)
    layer = next(m for n, m in fused.named_modules() if n.endswith("layers.1.self_attn.q_proj"))
    x = torch.randn(6, 64)
    with torch.no_grad():
        exact = layer(x)  # eval: no dropout
        layer.train()  # dropout 0.5 on the adapter's input, 1 / (1 - p) making up for it on average
        draws = torch.stack([layer(x) for _ in range(2000)])
    spread = draws.std(0).mean()
    assert spread > 1e-2  # dropout does something
    assert (draws.mean(0) - exact).abs().mean() < 0.1 * spread  # and is unbiased


# --------------------------------------------------------------------------------------------- whole runs


def test_run_writes_contract_files_and_adapts_only_the_plans_layers(tiny, examples, tmp_path) -> None:
    plan = _plan(tmp_path / "plan.json", layers=[1], layer_extra={"rank_pattern": {"1": 8}})
    r = T.train(_cfg(), None, plan, str(tiny), tmp_path / "run", examples=examples)
    run = tmp_path / "run"
    assert r.layers == [1] and r.steps == 12
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert weights and all(".layers.1." in k for k in weights)
    assert {tuple(v.shape) for k, v in weights.items() if "lora_A" in k and "q_proj" in k} == {(8, 64)}  # rank 8
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 13))
    assert [m["step"] for m in lines if "val_loss" in m] == [4, 8, 12]
    man = json.loads((run / "manifest.json").read_text())
    for key in ("config", "base_model", "base_model_path", "plan_sha256", "split_sha256", "seed", "task", "layers",
                "versions", "timings", "peak_memory_mb", "best_step", "stopped_early", "stop_reason"):
        assert key in man, key
    assert man["task"] == "label" and man["layers"] == [1]
    split = pl.read_parquet(run / "split.parquet")
    assert split.columns == run_art.SPLIT_COLUMNS + ["weight"] and run_art.split_sha256(split) == man["split_sha256"]
    train_w = split.filter(pl.col("split") == "train")["weight"]
    assert train_w.sum() == pytest.approx(1.0) and (train_w > 0).all()  # the sample the run drew from
    assert split.filter(pl.col("split") != "train")["weight"].sum() == 0
    assert lines[-1]["val_loss"] < lines[3]["val_loss"]  # it learned something


def test_adapter_loads_with_plain_peft_and_reproduces_the_best_validation_loss(tiny, examples, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plan = _plan(tmp_path / "plan.json")
    r = T.train(_cfg("train.max_eval_examples=0"), None, plan, str(tiny), tmp_path / "run", examples=examples)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "run" / "adapter")
    _, tok = load_model(tiny)
    val = pl.read_parquet(tmp_path / "run" / "split.parquet").filter(pl.col("split") == "val")
    enc = tk.encode_all(tok, val, 64)
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for e in enc:  # one by one, the plain way: labels -100 on the prompt
            ids = torch.tensor([e.ids])
            labels = ids.clone()
            labels[0, : e.n_prompt] = -100
            k = len(e.ids) - e.n_prompt
            total += model(input_ids=ids, labels=labels).loss.item() * k
            n += k
    assert total / n == pytest.approx(r.best_val_loss, rel=1e-4)


def test_early_stopping_fires_on_a_rising_validation_loss(tiny, examples, tmp_path) -> None:
    """Validation answers contradict training answers, so validation loss rises as training fits."""
    run = tmp_path / "run"
    run.mkdir()
    ex = examples.with_columns(pl.lit("cards").alias("domain"))
    split = ex.with_columns(
        pl.when(pl.int_range(pl.len()) < 40).then(pl.lit("val")).otherwise(pl.lit("train")).alias("split"),
        pl.when(pl.int_range(pl.len()) < 40).then(pl.lit("yes")).otherwise(pl.lit("no")).alias("reference"))
    split.select(run_art.SPLIT_COLUMNS).write_parquet(run / "split.parquet")  # a given split is used as is
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"domains": ["cards"]}))
    r = T.train(_cfg("train.max_steps=40", "train.eval_every=2", "train.patience=2", "train.warmup_steps=0"),
                None, plan, str(tiny), run, examples=ex)
    vals = [m["val_loss"] for m in r.metrics if "val_loss" in m]
    assert r.stopped_early and r.steps < 40
    assert r.steps == r.best_step + 2 * 2  # two validations without improvement after the best one
    assert vals[-1] > vals[-2] > min(vals) == r.best_val_loss  # it stopped on a rising curve
    man = json.loads((run / "manifest.json").read_text())
    assert man["stopped_early"] and man["adapter_step"] == r.best_step and "early stopping" in man["stop_reason"]


def test_resume_equals_an_uninterrupted_run(tiny, examples, tmp_path, monkeypatch) -> None:
    cfg = _cfg("train.lora.dropout=0.1")  # dropout draws random numbers: the RNG state must be restored too
    plan = _plan(tmp_path / "plan.json", layers=[1, 2])
    full = T.train(cfg, None, plan, str(tiny), tmp_path / "full", examples=examples)

    real_step, calls = T.train_step, {"n": 0}

    def crash_after_seven(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt  # killed during step 8; the last checkpoint is step 4
        return real_step(*a, **k)

    monkeypatch.setattr(T, "train_step", crash_after_seven)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, None, plan, str(tiny), tmp_path / "cut", examples=examples)
    monkeypatch.setattr(T, "train_step", real_step)
    with pytest.raises(TrainingError, match="--resume"):
        T.train(cfg, None, plan, str(tiny), tmp_path / "cut", examples=examples)
    resumed = T.train(cfg, None, plan, str(tiny), tmp_path / "cut", examples=examples, resume=True)

    def losses(run: str) -> list[tuple[int, float, float | None]]:
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["train_loss"], m.get("val_loss")) for m in rows]

    a, b = losses("full"), losses("cut")
    assert [s for s, *_ in a] == [s for s, *_ in b] == list(range(1, 13))
    for (_, la, va), (_, lb, vb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
        assert (va is None) == (vb is None) and (va is None or va == pytest.approx(vb, rel=1e-5))
    wa = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    assert resumed.best_step == full.best_step


def test_init_adapter_starts_from_the_earlier_weights(tiny, examples, tmp_path) -> None:
    plan = _plan(tmp_path / "plan.json", layers=[2])
    T.train(_cfg(), None, plan, str(tiny), tmp_path / "r1", examples=examples)
    base, _ = load_model(tiny)
    model = T.attach_lora(base, _cfg().train, [2], {})
    assert T.load_init_adapter(model, tmp_path / "r1" / "adapter") == 2 * 7  # A and B of 7 modules on layer 2
    saved = load_file(str(tmp_path / "r1" / "adapter" / "adapter_model.safetensors"))
    mine = {k.replace(".default", ""): v for k, v in T.trainable_state(model).items()}
    assert mine.keys() == saved.keys()
    for k in saved:
        assert torch.equal(mine[k], saved[k])
    # A run started from it begins where the first one ended: same seed, so its first batch is r1's first batch,
    # and its loss there sits near r1's last loss, far from r1's first (measured: 3.48 vs 3.77 last, 7.24 first;
    # the assertion allows half the drop, 6x what was seen, so float noise between CPUs cannot cross it).
    r1 = [json.loads(x)["train_loss"] for x in (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()]
    fresh, last = r1[0], r1[-1]
    r2 = T.train(_cfg("train.max_steps=1", "train.warmup_steps=0"), None, plan, str(tiny), tmp_path / "r2",
                 examples=examples, init_adapter=tmp_path / "r1" / "adapter")
    assert abs(r2.metrics[0]["train_loss"] - last) < 0.5 * (fresh - last)


def test_distillation_toward_an_identical_teacher_adds_nothing_at_the_start(tiny, examples, tmp_path) -> None:
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.2, 1.0, 3.0]])
    p_t, p_s = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    by_hand = (p_t * (p_t.log() - p_s.log())).sum() * 4
    assert T.distill_loss(s, t, 2.0).item() == pytest.approx(by_hand.item(), rel=1e-5)
    plan = _plan(tmp_path / "plan.json")
    cfg = _cfg("train.max_steps=1", "train.distill_weight=0.25")
    plain = T.train(cfg, None, plan, str(tiny), tmp_path / "plain", examples=examples)
    dist = T.train(cfg, None, plan, str(tiny), tmp_path / "dist", examples=examples, teacher=str(tiny))
    # LoRA B starts at 0, so the student equals the teacher: KL = 0 and the loss is (1 - w) * CE.
    assert dist.metrics[0]["train_loss"] == pytest.approx(0.75 * plain.metrics[0]["train_loss"], rel=1e-5)


# --------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_say_what_to_do(tiny, examples, tmp_path) -> None:
    with pytest.raises(PlanError, match=r"layers \[7\] but the model has 3 layers"):
        T.train(_cfg(), None, _plan(tmp_path / "p1.json", layers=[1, 7]), str(tiny), tmp_path / "a", examples=examples)
    with pytest.raises(PlanError, match="no examples"):
        T.train(_cfg(), None, _plan(tmp_path / "p2.json"), str(tiny), tmp_path / "b",
                examples=examples.filter(pl.col("domain") == "cards"))
    one = examples.head(1).with_columns(pl.lit("cards").alias("domain"))
    (tmp_path / "c").mkdir()
    one.with_columns(pl.lit("test").alias("split")).select(run_art.SPLIT_COLUMNS).write_parquet(tmp_path / "c" / "split.parquet")
    with pytest.raises(TrainingError, match="training split is empty"):
        T.train(_cfg(), None, _plan(tmp_path / "p3.json"), str(tiny), tmp_path / "c", examples=one)
    with pytest.raises(PlanError, match="--layers"):
        T.parse_layers("1-x", 3)
    assert T.parse_layers("last:2", 30) == [28, 29] and T.parse_layers("0,3-5", 30) == [0, 3, 4, 5]


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_weights(tiny, examples, tmp_path, monkeypatch) -> None:
    real, calls = T._loss, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(T, "_loss", poisoned)
    with pytest.raises(TrainingError, match="at step 6") as e:
        T.train(_cfg(), None, _plan(tmp_path / "plan.json"), str(tiny), tmp_path / "run", examples=examples)
    assert "step-5" in str(e.value)
    good = load_file(str(tmp_path / "run" / "checkpoints" / "step-5" / T.CKPT_WEIGHTS))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stop_reason"] == "non-finite loss at step 6"


# --------------------------------------------------------------------------------------------- scale out


@pytest.mark.slow
def test_qlora_on_a_4bit_base_learns(tiny, examples, tmp_path) -> None:
    r = T.train(_cfg("train.quantize_base=nf4", "train.max_steps=8"), None, _plan(tmp_path / "plan.json"),
                str(tiny), tmp_path / "run", examples=examples)
    assert r.metrics[-1]["train_loss"] < r.metrics[0]["train_loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def _two_processes(launcher: list[str], examples, tiny, tmp_path) -> None:
    """Train 4 steps with ``launcher + [script]`` starting 2 CPU processes; check one run came out of it."""
    examples.write_parquet(tmp_path / "ex.parquet")
    plan = _plan(tmp_path / "plan.json", layers=[1, 2])
    script = tmp_path / "run_train.py"
    script.write_text(
        "import sys, polars as pl\n"
        "from adaptive_ft.config import load_config\nfrom adaptive_ft.finetune import train\n"
        f"cfg = load_config(None, {['train.max_steps=4', 'train.batch_size=4', 'train.eval_every=2', 'train.lora.r=4', 'train.threads=1']!r})\n"
        f"train(cfg, None, {str(plan)!r}, {str(tiny)!r}, {str(tmp_path / 'run')!r}, "
        f"examples=pl.read_parquet({str(tmp_path / 'ex.parquet')!r}))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # HF_HOME: no user accelerate config
    done = subprocess.run(launcher + [str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert [p.name for p in run.iterdir() if p.name.startswith("adapter")] == ["adapter"]
    man = json.loads((run / "manifest.json").read_text())
    assert man["world_size"] == 2 and man["steps"] == 4
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one process writes the log


@pytest.mark.slow
def test_torchrun_two_processes_write_one_adapter(tiny, examples, tmp_path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    _two_processes([str(torchrun), "--standalone", "--nproc_per_node=2"], examples, tiny, tmp_path)


@pytest.mark.slow
def test_accelerate_launch_two_processes_write_one_adapter(tiny, examples, tmp_path) -> None:
    """`accelerate launch` starts the processes through torch.distributed.run, as torchrun does; train() joins
    the process group from the environment it sets (gloo on the CPU)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    _two_processes([str(accelerate), "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
                    "--mixed_precision=no", "--dynamo_backend=no"], examples, tiny, tmp_path)


def test_off_a_terminal_training_prints_a_line_per_validation_and_no_bar(tiny, examples, tmp_path, capsys) -> None:
    """stderr captured (a file, not a TTY): tqdm's bar is off (no carriage-return frames), one line per validation."""
    T.train(_cfg(), None, _plan(tmp_path / "plan.json"), str(tiny), tmp_path / "run", examples=examples)
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err and "step/s" not in err
    lines = [x for x in err.splitlines() if x.startswith("train: step")]
    assert [x.split()[2] for x in lines] == ["4/12", "8/12", "12/12"] and all("val_loss" in x for x in lines)


def test_time_budget_stops_the_run_and_says_so(tiny, examples, tmp_path) -> None:
    # 1e-6 minutes is 60 microseconds: no CPU runs a forward and a backward pass through a Llama (and Python's
    # overhead around them) that fast, so step 1 always overruns it (0.0001 minutes, 6 ms, a fast CPU could beat).
    r = T.train(_cfg("train.max_steps=500", "train.max_minutes=1e-6"), None, _plan(tmp_path / "plan.json"),
                str(tiny), tmp_path / "run", examples=examples)
    assert r.steps == 1 and r.stop_reason.startswith("time budget of 1e-06 minutes reached at step 1")
    assert "val_loss" in r.metrics[-1]  # the last step is validated, so the best adapter is chosen knowingly
    assert T.lr_lambda(_cfg("train.warmup_steps=0").train, 100, clock=lambda: 1.0)(5) == 0.0  # decayed by time


def test_cli_trains_from_a_store(tiny, tmp_path) -> None:
    """simulate -> ingest -> train through the CLI, with a hand-written plan."""
    from click.testing import CliRunner

    from adaptive_ft.cli import cli

    runner = CliRunner()
    log, store = tmp_path / "logs.jsonl", tmp_path / "s.duckdb"
    assert runner.invoke(cli, ["simulate", "--out", str(log), "--events", "1500", "--users", "40"]).exit_code == 0
    assert runner.invoke(cli, ["ingest", "--store", str(store), str(log)]).exit_code == 0
    truth = json.loads(log.with_suffix(".truth.json").read_text())
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"domains": truth["domains"][:2], "layers": {"selected": [2]}}))
    res = runner.invoke(cli, ["train", "--store", str(store), "--plan", str(plan), "--model", str(tiny),
                              "--out", str(tmp_path / "run"), "--max-steps", "3", "--batch-size", "4",
                              "train.threads=1", "train.eval_every=0"])
    assert res.exit_code == 0, res.output
    assert "trained 3 steps on layers 2 " in res.output
    again = runner.invoke(cli, ["train", "--store", str(store), "--plan", str(plan), "--model", str(tiny),
                                "--out", str(tmp_path / "run"), "--max-steps", "3"])
    assert again.exit_code == 1 and "already holds a run; pass --resume" in again.output
    assert "Examples:" in runner.invoke(cli, ["train", "--help"]).output
