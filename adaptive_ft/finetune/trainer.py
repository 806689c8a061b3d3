"""The selective LoRA training loop: plan-weighted batches, answer-only loss, validation, checkpoints, DDP.

Where the time goes, and what this loop does about it (a 135M model on 2 CPU cores):

- Only the answer tokens carry loss, so the output layer (49152 x 576 for SmolLM2, a fifth of the model) is
  applied to the positions that predict an answer token only, not to every position of every sequence.
- Base weights are frozen and nothing below the lowest adapted layer requires a gradient, so autograd records
  no graph there: the backward pass stops at the lowest adapted layer.
- Batches are grouped by length and right-padded; with causal attention no real token ever attends to a pad,
  so no attention mask is built and SDPA takes its causal fast path.
- peft's LoRA forward makes four passes over each adapted layer's activations besides its matmuls (dropout
  mask, scaling, product, sum); :func:`fuse_lora` folds the scaling and the sum into the GEMM and draws the
  dropout mask, on a CPU from a faster generator than torch's and in the input's dtype (:func:`dropout_mask`).
- Sibling layers called on one input (q/k/v, gate/up) run as one :class:`LoraGroup` (:func:`group_lora`):
  one base GEMM, one dropout mask and one GEMM per LoRA factor for the set, instead of one per layer.
- On a CPU that multiplies bf16 natively (``train.precision: auto``), the forward passes run under bf16
  autocast, so the matmuls that are most of a step take the bf16 units; weights and optimizer stay fp32.
  The frozen base's Linear weights are cast to bf16 once (:func:`keep_frozen_casts`), not on every forward,
  and attention takes the math kernel, whose bf16 backward is faster than the flash kernel's on a CPU.
- On a CPU the optimizer is torch's fused AdamW (:func:`make_optimizer`), one pass per parameter, not ten ops.
- DDP is a single all-reduce of the (small) flattened LoRA gradient per step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import shutil
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adaptive_ft.artifacts import run as run_art
from adaptive_ft.artifacts.plan import Plan
from adaptive_ft.config import Config, TrainConfig, config_to_dict
from adaptive_ft.errors import ModelError, PlanError, TrainingError
from adaptive_ft.files import file_sha256
from adaptive_ft.finetune import data as D
from adaptive_ft.lm import tokens as tk
from adaptive_ft.lm.models import load_model, model_fingerprint, resolve_model

CKPT_STATE = "trainer_state.pt"
CKPT_WEIGHTS = "adapter_model.safetensors"


@dataclass
class TrainResult:
    """What a run produced: where, how far it went, how fast, and why it stopped."""

    run_dir: Path
    adapter_dir: Path
    steps: int
    layers: list[int]
    best_step: int | None
    best_val_loss: float | None
    final_train_loss: float | None
    stopped_early: bool
    stop_reason: str
    train_seconds: float
    examples_per_s: float
    tokens_per_s: float
    n_train: int
    n_val: int
    n_test: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None  # the checkpoint's step when this session continued a run
    session_steps: int = 0           # steps this session trained (``steps`` counts the whole run)
    session_seconds: float = 0.0     # this session's training time (``train_seconds`` is the whole run's)


# --------------------------------------------------------------------------------------------- processes


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun / accelerate (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if world <= 1:
        return Dist(0, 1, device)
    if not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(torch.distributed.get_rank(), world, device)


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware: the avx512_bf16 or amx_bf16 flag in ``/proc/cpuinfo``."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def autocast_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward passes (None: plain fp32).

    ``auto`` takes bf16 on a CPU that multiplies it natively, where its matmuls run about twice as fast as
    fp32 ones, and keeps fp32 where bf16 would be emulated (slower) and on GPUs. Weights, gradients and the
    optimizer stay fp32; the loss is taken in fp32.
    """
    if tc.precision == "bf16":
        return torch.bfloat16
    if tc.precision == "auto" and device.type == "cpu" and native_bf16():
        return torch.bfloat16
    return None


def set_threads(tc: TrainConfig, world: int) -> None:
    """Use the configured threads, or share the cores among the run's processes."""
    n = tc.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------- model


def parse_layers(spec: str | list[int] | None, n: int) -> list[int] | None:
    """``"all"``, ``"12,13"``, ``"15-29"``, ``"last:6"`` (or a list) -> sorted layer indices; None = the plan's."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, list):
        return sorted(set(spec))
    spec = spec.strip()
    if spec == "all":
        return list(range(n))
    if spec.startswith("last:"):
        k = int(spec.split(":", 1)[1])
        return list(range(max(0, n - k), n))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            elif part.strip():
                out.add(int(part))
    except ValueError:
        raise PlanError(f"--layers {spec!r}: expected 'all', 'last:K', or indices like '12,13' or '15-29'") from None
    return sorted(out)


def choose_layers(plan: Plan, override: list[int] | str | None, n: int) -> list[int]:
    """The adapted layers: ``override``, else the plan's, else all; a clear error for layers the model lacks."""
    layers = parse_layers(override, n)
    source = "--layers"
    if layers is None:
        layers = plan.layers.selected if plan.layers and plan.layers.selected else list(range(n))
        source = "the plan's layers.selected"
    bad = [i for i in layers if i < 0 or i >= n]
    if bad:
        raise PlanError(f"{source} names layers {bad} but the model has {n} layers (0-{n - 1}); re-run "
                        f"`adaptive-ft prioritize` with this model or pass --layers")
    if not layers:
        raise PlanError(f"{source} selects no layers")
    return layers


def lora_config(tc: TrainConfig, layers: list[int], rank_pattern: dict[str, int], n: int) -> Any:
    """A peft LoraConfig on ``layers``; per-layer ranks keep alpha / r constant so the update scale stays put."""
    from peft import LoraConfig

    ranks = {f"layers\\.{int(k)}\\..*": int(v) for k, v in rank_pattern.items() if int(k) in layers}
    alphas = {k: tc.lora.alpha * v / tc.lora.r for k, v in ranks.items()}
    subset = len(layers) < n
    return LoraConfig(
        r=tc.lora.r, lora_alpha=tc.lora.alpha, lora_dropout=tc.lora.dropout,
        target_modules=list(tc.lora.target_modules), task_type="CAUSAL_LM", bias="none",
        layers_to_transform=list(layers) if subset else None, layers_pattern="layers" if subset else None,
        rank_pattern=ranks, alpha_pattern=alphas,
    )


def attach_lora(base: Any, tc: TrainConfig, layers: list[int], rank_pattern: dict[str, int]) -> Any:
    """Wrap ``base`` in a peft model with adapters on ``layers`` only; everything else frozen."""
    from peft import get_peft_model

    n = int(base.config.num_hidden_layers)
    try:
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; nothing to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            model = get_peft_model(base, lora_config(tc, layers, rank_pattern, n))
    except ValueError as e:
        raise ModelError(f"cannot attach LoRA: {e} (train.lora.target_modules = {tc.lora.target_modules}; "
                         f"they must name Linear modules of this model, e.g. q_proj, v_proj)") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


MASK_LEVELS = 65536  # a CPU dropout mask drops with probability p rounded to a multiple of 1 / MASK_LEVELS


def dropout_mask(shape: tuple[int, ...], p: float, device: torch.device,
                 dtype: torch.dtype = torch.bool) -> tuple[torch.Tensor, float]:
    """A keep-mask dropping each entry with probability ``p``, and the probability it really used.

    On a CPU torch draws Bernoulli masks one element at a time from its Mersenne Twister, slow enough to be
    a large share of a bf16 LoRA step; there the mask is 16-bit slices of numpy's PCG64 output, compared with
    ``p`` rounded to 1/65536 (returned, so the caller's ``1 / (1 - p)`` keeps the update unbiased). Its seed
    is drawn from torch's generator, so ``torch.manual_seed`` and a checkpoint's saved RNG state reproduce
    every mask (resume equals an uninterrupted run). Elsewhere (a GPU) torch's own ``bernoulli_``, boolean.

    ``dtype`` float32 or bfloat16 (on a CPU): the same mask as 0.0 / 1.0 in that dtype, written as the float's
    bit pattern in the comparison's own pass. A boolean mask multiplied into a float input is converted by
    the product and again by its backward, two passes over the activations a call that this saves.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p), p
    cut = round(p * MASK_LEVELS)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    n = math.prod(shape)
    bits = np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n].reshape(tuple(shape))
    keep = bits >= cut
    if dtype in _MASK_ONES:
        ones, word = _MASK_ONES[dtype]
        return torch.from_numpy(np.multiply(keep, ones, dtype=word)).view(dtype), cut / MASK_LEVELS
    return torch.from_numpy(keep), cut / MASK_LEVELS


# the bit pattern of 1.0 and its unsigned word, per mask dtype dropout_mask writes directly
_MASK_ONES = {torch.float32: (0x3F800000, np.uint32), torch.bfloat16: (0x3F80, np.uint16)}


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype when autocast is on: cast once for the base and the adapter (and its dropout
    mask applied in that dtype) instead of once by each of their matmuls. Exact: the mask is 0 or 1."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype == torch.float32:
        return x.to(torch.get_autocast_dtype(dev))
    return x


def _fused_lora_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA Linear forward, ``base(x) + scaling * B(A(dropout(x)))``, in fewer passes over the activations.

    The low-rank update is added by the GEMM itself (``addmm`` with ``alpha = scaling``) instead of a product
    and a sum over the layer's whole output; dropout is a 0/1 mask (:func:`dropout_mask`), and its
    ``1 / (1 - p)`` rides in that alpha too (the update is linear in its input). Same function, same expectation under dropout; any other
    case (several or merged adapters, DoRA-like variants, extra arguments) takes peft's own forward.
    """
    name = layer.active_adapters[0] if len(layer.active_adapters) == 1 else None
    p = float(getattr(layer.lora_dropout[name], "p", 0.0)) if name in layer.lora_dropout else 0.0
    if (args or kwargs or name is None or layer.disable_adapters or layer.merged or name not in layer.lora_A
            or name in layer.lora_variant or p >= 1):
        return type(layer).forward(layer, x, *args, **kwargs)
    a, b = layer.lora_A[name], layer.lora_B[name]
    x = _autocast_input(x)
    result = layer.base_layer(x)
    alpha = layer.scaling[name]
    h = x
    if layer.training and p > 0:
        keep, p = dropout_mask(x.shape, p, x.device, x.dtype)
        h = x * keep
        alpha = alpha / (1.0 - p)
    low = a(h)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]).to(result.dtype),
                      b.weight.t().to(result.dtype), alpha=alpha)
    return out.view(result.shape)


def fuse_lora(model: Any) -> int:
    """Route every peft LoRA Linear of ``model`` through :func:`_fused_lora_forward`; returns how many."""
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    return n


# sibling layers a decoder layer calls on one input (Llama, Mistral, Qwen, Gemma: attention's q/k/v, the
# MLP's gate/up); group_lora computes each such set as one
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class LoraGroup:
    """Sibling fused LoRA Linear layers the model calls on the same input, computed together.

    The base weights are one concatenated matrix (the members' weights become views of it), the adapters' A
    matrices are concatenated on every call (they train) and their B matrices, each times its scaling, form
    one block-diagonal matrix: a call is one base GEMM, one dropout mask (shared by the members: each still
    drops its input at ``p``), one A GEMM and one B GEMM for the whole set, instead of that per member. The
    first member called computes every member's output; the others take theirs when called on the same
    tensor in the same state (weights, grad mode, autocast and train/eval unchanged), else compute afresh.

    The shared dropout mask differs from peft on separate q/k/v layers (one mask per layer) and is what LoRA's
    reference implementation does where q/k/v are one projection: ``loralib.MergedLinear`` (microsoft/LoRA,
    used for GPT-2's fused ``c_attn`` in the paper's experiments) applies one ``lora_dropout(x)`` to the input
    of all of them, as peft does on a fused-qkv model. Drawing one mask per member instead measured the
    group's speed-up down to within noise.
    """

    def __init__(self, members: list[Any]):
        self.members = members
        self.sizes = [m.base_layer.out_features for m in members]
        first = members[0].base_layer
        weight = torch.cat([m.base_layer.weight.detach() for m in members])
        self.base = torch.nn.Linear(first.in_features, weight.shape[0], bias=False, device=weight.device,
                                    dtype=weight.dtype).requires_grad_(False)
        self.base.weight.data = weight
        for m, w in zip(members, weight.split(self.sizes)):
            m.base_layer.weight.data = w  # one copy of the base, shared with the members' own layers
            m.base_layer.grouped = True
        self.key: tuple[Any, ...] | None = None  # the state the waiting outputs were computed in
        self.x: torch.Tensor | None = None  # their input, held so that its id is not reused while they wait
        self.ready: dict[int, torch.Tensor] = {}  # member id -> its output, until that member is called

    def adapter(self) -> str | None:
        """The one adapter every member runs plainly (single, unmerged, vanilla LoRA, same dropout and train/eval
        mode), else None: then each member runs on its own."""
        first = self.members[0]
        if len(first.active_adapters) != 1:
            return None
        name = first.active_adapters[0]
        p = None
        for m in self.members:
            if (m.active_adapters != first.active_adapters or m.disable_adapters or m.merged
                    or m.training != first.training or name not in m.lora_A or name in m.lora_variant
                    or m.lora_A[name].bias is not None or m.lora_B[name].bias is not None):
                return None
            q = float(getattr(m.lora_dropout[name], "p", 0.0))
            if (p is not None and q != p) or q >= 1:
                return None
            p = q
        return name

    def _key(self, x: torch.Tensor, name: str) -> tuple[Any, ...]:
        dev = x.device.type
        versions = tuple(w._version for m in self.members for w in (m.lora_A[name].weight, m.lora_B[name].weight))
        return (id(x), x._version, torch.is_grad_enabled(), torch.is_autocast_enabled(dev),
                self.members[0].training, versions)

    def forward(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output on ``x``: taken from the set's last computation when it is still valid."""
        name = self.adapter()
        if name is None:
            return _fused_lora_forward(layer, x)
        key = self._key(x, name)
        if key == self.key and id(layer) in self.ready:
            out = self.ready.pop(id(layer))
            if not self.ready:
                self.key, self.x = None, None
            return out
        outs = self._compute(x, name)
        self.key, self.x = key, x
        self.ready = {id(m): o for m, o in zip(self.members, outs) if m is not layer}
        return outs[self.members.index(layer)]

    def _compute(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
        x = _autocast_input(x)
        result = self.base(x)
        p = float(getattr(self.members[0].lora_dropout[name], "p", 0.0))
        scale = 1.0
        h = x
        if self.members[0].training and p > 0:
            keep, p = dropout_mask(x.shape, p, x.device, x.dtype)
            h = x * keep
            scale = 1.0 / (1.0 - p)
        a = torch.cat([m.lora_A[name].weight for m in self.members])
        b = torch.block_diag(*[m.lora_B[name].weight * (m.scaling[name] * scale) for m in self.members])
        low = F.linear(h, a)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]).to(result.dtype),
                          b.t().to(result.dtype))
        return out.view(result.shape).split(self.sizes, -1)


def _grouped_lora_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs:
        return _fused_lora_forward(layer, x, *args, **kwargs)
    return layer.lora_group.forward(layer, x)


def group_lora(model: Any) -> list[LoraGroup]:
    """Compute each set of sibling LoRA layers on a shared input (:data:`SHARED_INPUT`) as one :class:`LoraGroup`.

    Call after :func:`fuse_lora` and after the model is on its device (the concatenated base weights are not
    registered in the model, so ``.to()`` would not move them). Members need plain ``nn.Linear`` base layers
    of one input size, dtype and device without bias (a quantized base is left alone). Returns the groups.
    """
    from peft.tuners.lora import Linear as LoraLinear

    groups = []
    for parent in list(model.modules()):
        for names in SHARED_INPUT:
            members = [m for n in names if type(m := getattr(parent, n, None)) is LoraLinear]
            bases = [m.base_layer for m in members]
            if len(members) < 2 or any(type(b) is not torch.nn.Linear or b.bias is not None for b in bases):
                continue
            w = bases[0].weight
            if any(b.in_features != bases[0].in_features or b.weight.dtype != w.dtype or b.weight.device != w.device
                   or not b.weight.is_floating_point() for b in bases):
                continue
            group = LoraGroup(members)
            for m in members:
                m.lora_group = group
                m.forward = types.MethodType(_grouped_lora_forward, m)
            groups.append(group)
    return groups


def _cast_linear_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` that, under autocast to its copy's dtype, multiplies by the copy kept for it."""
    w = layer.weight
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == layer.autocast_weight.dtype:
        w = layer.autocast_weight
    return F.linear(x, w, layer.bias)


def keep_frozen_casts(model: Any, dtype: torch.dtype) -> int:
    """Give every frozen fp32 ``nn.Linear`` of ``model`` a ``dtype`` copy of its weight, used under autocast.

    Autocast casts each weight a matmul takes on every call; for a frozen base that is the whole model
    re-cast every forward pass, for the same result each time. The copy is that cast done once (the same
    rounding, so a forward is bit-for-bit the one autocast would run), and the fp32 weight stays for every
    pass outside autocast (validation, and anything that reads the base's weights). Trainable layers (the
    adapter's) and non-fp32 ones (a quantized base) are left alone; a :class:`LoraGroup`'s concatenated
    base gets one copy, its members none. Returns how many layers got a copy.
    """
    n = 0
    groups = {id(m.lora_group): m.lora_group.base for m in model.modules() if hasattr(m, "lora_group")}
    for module in [*model.modules(), *groups.values()]:
        if getattr(module, "grouped", False):
            continue  # its weight is part of a group's, which has the copy
        if type(module) is torch.nn.Linear and not module.weight.requires_grad \
                and module.weight.dtype == torch.float32:
            module.autocast_weight = module.weight.detach().to(dtype)
            module.forward = types.MethodType(_cast_linear_forward, module)
            n += 1
    return n


def make_optimizer(params: list[torch.Tensor], tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the adapter's parameters; on a CPU torch's fused kernel (one pass per parameter).

    Without it, AdamW on a CPU runs its for-loop form: about ten small ops per parameter, and all-layer
    LoRA has a few hundred parameters, each op a thread-pool dispatch. The fused kernel computes the same
    update in one pass. A GPU keeps torch's default (its foreach form).
    """
    extra = {"fused": True} if device.type == "cpu" else {}
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, **extra)


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights by parameter name (what checkpoints store)."""
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_init_adapter(model: Any, path: str | Path) -> int:
    """Copy an earlier adapter's weights into ``model`` where names and shapes match; returns how many tensors."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"--init-adapter {path}: no adapter_config.json there; pass a RUN/adapter folder")
    weights = load_peft_weights(str(path), device="cpu")
    own = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    result = set_peft_model_state_dict(model, weights)
    loaded = len(own) - len([k for k in result.missing_keys if "lora_" in k])
    if loaded == 0:
        raise ModelError(f"--init-adapter {path}: none of its weights fit this model's adapter (different "
                         f"layers, modules or rank?)")
    return loaded




def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (Hinton et al., 2015)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


# --------------------------------------------------------------------------------------------- state


@dataclass
class LoopState:
    """Everything besides weights and optimizer that a checkpoint must restore to continue identically."""

    step: int = 0
    epoch: int = 0
    batch_idx: int = 0
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    tokens: int = 0
    examples: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0  # wall time of every session up to this checkpoint (the manifest's total_s)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Batches:
    """Endless, resumable stream of this process's batches: (epoch, index) says where it is."""

    def __init__(self, weights: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int, dist: Dist,
                 epoch: int = 0, idx: int = 0):
        self.args = (weights, lengths, batch_size, seed)
        self.dist = dist
        self.epoch, self.idx = epoch, idx
        self.current = self._epoch(epoch)

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        w, lengths, bs, seed = self.args
        return D.epoch_batches(w, lengths, bs, seed, epoch, self.dist.rank, self.dist.world)

    def per_epoch(self) -> int:
        return len(self.current)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        if self.idx >= len(self.current):
            self.epoch, self.idx = self.epoch + 1, 0
            self.current = self._epoch(self.epoch)
        batch = self.current[self.idx]
        self.idx += 1
        return batch


def save_checkpoint(run: Path, model: Any, opt: Any, sched: Any, state: LoopState, keep: int) -> Path:
    """Write RUN/checkpoints/step-N atomically (a temp folder renamed into place), then drop the oldest ones."""
    from safetensors.torch import save_file

    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / CKPT_WEIGHTS))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(), "loop": state.as_dict(),
                # LoRA dropout on a GPU draws from the CUDA generators, not the CPU one
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / CKPT_STATE)
    (tmp / "trainer_state.json").write_text(json.dumps(state.as_dict(), indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(checkpoints(run), key=_step_of)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run: Path) -> list[Path]:
    root = run / "checkpoints"
    return [p for p in root.glob("step-*") if (p / CKPT_STATE).is_file()] if root.is_dir() else []


def _step_of(p: Path) -> int:
    return int(p.name.split("-", 1)[1])


def load_checkpoint(path: Path, model: Any, opt: Any, sched: Any) -> LoopState:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint (no arbitrary pickle: weights_only)."""
    from safetensors.torch import load_file

    weights = load_file(str(path / CKPT_WEIGHTS))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    saved = torch.load(path / CKPT_STATE, weights_only=True)
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    if saved.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return LoopState(**saved["loop"])


# --------------------------------------------------------------------------------------------- schedule


def lr_lambda(tc: TrainConfig, total: int, clock: Any = None) -> Any:
    """Linear warm-up, then cosine / linear decay to 0 at ``total`` steps, or constant.

    ``clock()`` (with train.max_minutes) returns the elapsed share of the time budget; the decay follows
    whichever of steps and time is further along, so a time-limited run still ends at a low learning rate.
    """
    warm = max(0, tc.warmup_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if tc.scheduler == "constant":
            return 1.0
        progress = min(1.0, max((step - warm) / max(1, total - warm), clock() if clock else 0.0))
        if tc.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def total_steps(tc: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps from max_steps, else from epochs."""
    if tc.max_steps > 0:
        return tc.max_steps
    return max(1, math.ceil(tc.epochs * batches_per_epoch / tc.grad_accum))


# --------------------------------------------------------------------------------------------- data


@dataclass
class RunData:
    """The run's split and its encoded training / validation examples."""

    split: pl.DataFrame
    train: list[tk.Encoded]
    val: list[tk.Encoded]
    weights: np.ndarray
    lengths: np.ndarray
    truncated: int
    task: str




def prepare_data(cfg: Config, plan: Plan, examples: pl.DataFrame, tok: Any, out: Path, dist: Dist) -> RunData:
    """Select the plan's examples, split them (or reuse RUN/split.parquet), encode and weight the training split."""
    tc = cfg.train
    path = out / "split.parquet"
    if path.is_file():
        split = pl.read_parquet(path)  # the same split across resumes, processes and later evaluation
    else:
        split = D.split_examples(D.select_examples(examples, plan), tc.val_fraction, tc.test_fraction, cfg.seed)
        # each training row's sampling probability, so the evaluation's representation audit sees the sample
        # the run drew (the plan's weights), not just which examples were eligible
        is_train = (split["split"] == "train").to_numpy()
        weight = np.zeros(split.height)
        if is_train.any():
            weight[is_train] = D.train_probabilities(split.filter(pl.col("split") == "train"), plan)
        split = split.with_columns(weight=pl.Series(weight))
        if dist.main:
            tmp = path.with_suffix(".parquet.tmp")
            split.write_parquet(tmp)
            tmp.replace(path)
    train = split.filter(pl.col("split") == "train")
    if train.height == 0:
        raise TrainingError(f"the training split is empty ({split.height} examples in the plan's domains); "
                            f"ingest more examples or lower train.val_fraction / train.test_fraction")
    val = split.filter(pl.col("split") == "val")
    if tc.max_eval_examples and val.height > tc.max_eval_examples:
        val = val.sample(tc.max_eval_examples, seed=cfg.seed, shuffle=False)
    enc_train = tk.encode_all(tok, train, tc.max_seq_len)
    enc_val = tk.encode_all(tok, val, tc.max_seq_len)
    truncated = sum(e.truncated for e in enc_train) + sum(e.truncated for e in enc_val)
    if truncated and dist.main:
        tqdm.write(f"{truncated} examples longer than train.max_seq_len={tc.max_seq_len} were truncated")
    # the sampler draws with the weights split.parquet records (computed once, above), so what the run audits
    # and what it draws cannot drift apart on --resume
    weights = train["weight"].to_numpy() if "weight" in train.columns else D.train_probabilities(train, plan)
    return RunData(split, enc_train, enc_val, weights,
                   np.array([len(e.ids) for e in enc_train]), truncated, run_art.guess_task(split))


# --------------------------------------------------------------------------------------------- loop


@dataclass
class Ctx:
    """What one training step needs."""

    model: Any
    opt: Any
    sched: Any
    tc: TrainConfig
    dist: Dist
    pad_id: int
    teacher: Any = None
    started: float = 0.0     # this session's time.time() at start
    prior_wall: float = 0.0  # wall seconds of the sessions before this one (0 for a fresh run)
    amp: torch.dtype | None = None  # autocast dtype of the forward passes (autocast_dtype); None = fp32

    def forward(self) -> Any:
        """The context the forward passes run in: autocast to ``amp``, or nothing."""
        if self.amp is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.dist.device.type, dtype=self.amp))
        if self.dist.device.type == "cpu":
            # the CPU flash-attention kernel's bf16 backward is several times slower than its fp32 one at
            # these short sequences; the math kernel (matmuls and a softmax) is not
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack


def _checkpoint(ctx: Ctx, out: Path, state: LoopState, keep: int) -> Path:
    """save_checkpoint with the run's wall time so far, so a resumed run's total_s counts every session."""
    state.wall_seconds = ctx.prior_wall + time.time() - ctx.started
    return save_checkpoint(out, ctx.model, ctx.opt, ctx.sched, state, keep)


def _loss(ctx: Ctx, batch: dict[str, Any], n_answer: int) -> torch.Tensor:
    """This micro-batch's share of the step loss: summed answer-token CE over the step's answer tokens."""
    dev = ctx.dist.device
    ids, pos, tgt = batch["input_ids"].to(dev), batch["predict_pos"].to(dev), batch["targets"].to(dev)
    with ctx.forward():
        logits = tk.answer_logits(ctx.model, ids, pos).float()
    loss = F.cross_entropy(logits, tgt, reduction="sum") / n_answer
    if ctx.teacher is not None:
        with torch.no_grad(), ctx.forward():
            t_logits = tk.answer_logits(ctx.teacher, ids, pos).float()
        w = ctx.tc.distill_weight
        kl = distill_loss(logits, t_logits, ctx.tc.distill_temperature) * (len(tgt) / n_answer)
        loss = (1 - w) * loss + w * kl
    return loss


def _reduce_grads(ctx: Ctx, params: list[torch.Tensor]) -> None:
    """Average the adapter gradients over processes: one all-reduce of a flat buffer (what DDP does)."""
    if ctx.dist.world == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    ctx.dist.all_sum(flat)
    flat /= ctx.dist.world
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


@dataclass
class StepOut:
    """One optimizer step, summed over processes."""

    loss: float
    tokens: int
    examples: int
    lr: float
    finite: bool


def train_step(ctx: Ctx, micro: list[list[tk.Encoded]], params: list[torch.Tensor]) -> StepOut:
    """Forward/backward over the micro-batches, reduce, clip, step; a non-finite loss skips the update."""
    batches = [tk.collate(m, ctx.pad_id) for m in micro]
    n_answer = sum(len(b["targets"]) for b in batches)
    total = 0.0
    for b in batches:
        loss = _loss(ctx, b, n_answer)
        loss.backward()
        total += float(loss.detach())
    _reduce_grads(ctx, params)
    sums = ctx.dist.all_sum(torch.tensor([total, sum(b["n_tokens"] for b in batches), sum(len(m) for m in micro)],
                                         dtype=torch.float64))
    loss_v = float(sums[0]) / ctx.dist.world
    lr = float(ctx.opt.param_groups[0]["lr"])
    finite = math.isfinite(loss_v)
    if finite:
        if ctx.tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, ctx.tc.max_grad_norm)
        ctx.opt.step()
        ctx.sched.step()
    ctx.opt.zero_grad(set_to_none=True)
    return StepOut(loss_v, int(sums[1]), int(sums[2]), lr, finite)


@torch.no_grad()
def validate(ctx: Ctx, examples: list[tk.Encoded], batch_size: int) -> tuple[float, float]:
    """(answer-token loss, exact-match rate) on ``examples``; exact = every answer token is the argmax.

    Exact match under teacher forcing equals greedy decoding reproducing the reference and stopping. Always
    in fp32 (whatever ``train.precision``): the best adapter is chosen on the loss evaluation will see.
    """
    order = np.argsort([len(e.ids) for e in examples], kind="stable")
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][ctx.dist.rank::ctx.dist.world]
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, answer tokens, exact examples, examples
    ctx.model.eval()
    for chunk in chunks:
        b = tk.collate([examples[i] for i in chunk], ctx.pad_id)
        dev = ctx.dist.device
        logits = tk.answer_logits(ctx.model, b["input_ids"].to(dev), b["predict_pos"].to(dev))
        tgt = b["targets"].to(dev)
        wrong = torch.zeros(len(chunk), device=dev).index_add_(0, b["row"].to(dev), (logits.argmax(-1) != tgt).float())
        sums += torch.tensor([F.cross_entropy(logits, tgt, reduction="sum").item(), len(tgt),
                              (wrong == 0).sum().item(), len(chunk)], dtype=torch.float64)
    ctx.model.train()
    ctx.dist.all_sum(sums)
    return float(sums[0] / max(1, sums[1])), float(sums[2] / max(1, sums[3]))


def _save_adapter(model: Any, dest: Path) -> None:
    """Save the peft adapter to ``dest`` atomically (a temp folder renamed into place)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _append_metrics(out: Path, record: dict[str, Any]) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(out: Path, step: int) -> list[dict[str, Any]]:
    """On resume, forget metrics logged after the checkpoint, so the file equals an uninterrupted run's."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in kept if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("adaptive-ft", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "polars"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (or peak GPU memory on CUDA) in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------- the run


def _check_out(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; refuse to overwrite a finished or started run without --resume."""
    ckpts = checkpoints(out)
    if resume:
        if not ckpts:
            raise TrainingError(f"--resume: no checkpoint in {out}/checkpoints; start the run without --resume")
        return max(ckpts, key=_step_of)
    if ckpts or (out / "manifest.json").is_file():
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    return None


SETTINGS = "settings.json"  # RUN/checkpoints/settings.json: the run's own settings, for --resume after a crash


def run_settings(out: Path) -> dict[str, Any] | None:
    """The settings a run started with: its manifest, else ``checkpoints/settings.json`` (a run cut short)."""
    for path in (out / "manifest.json", out / "checkpoints" / SETTINGS):
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_conflicts(prior: dict[str, Any], cfg: Config, plan_path: str | Path, base_path: Path | None,
                     layers: list[int] | None, teacher: str | None) -> list[str]:
    """Each setting given for a resume that differs from the run's own, named by its key.

    A resumed run must continue exactly the run it continues (same data, schedule and model), so a changed
    setting is refused rather than half-applied (the optimizer state and the schedule come from the checkpoint).
    """
    problems = []
    # both through JSON, as the manifest stored them (tuples become lists)
    mine = _flat(json.loads(json.dumps(config_to_dict(cfg), default=str)))
    theirs = _flat(prior.get("config") or {})
    for key in sorted(mine.keys() & theirs.keys()):
        if key != "model" and mine[key] != theirs[key]:
            problems.append(f"{key} is {mine[key]!r} here but {theirs[key]!r} in the run")
    if prior.get("plan_sha256") and file_sha256(plan_path) != prior["plan_sha256"]:
        problems.append(f"plan {plan_path} is not the plan the run was trained on ({prior.get('plan')})")
    if base_path is not None and prior.get("base_model_path") and \
            Path(prior["base_model_path"]).resolve() != base_path.resolve():
        problems.append(f"model {base_path} is not the run's base ({prior['base_model_path']}); leave --model out")
    if layers is not None and prior.get("layers") is not None and layers != prior["layers"]:
        problems.append(f"layers {layers} differ from the run's {prior['layers']}")
    if teacher is not None and teacher != prior.get("teacher"):
        problems.append(f"teacher {teacher!r} differs from the run's {prior.get('teacher')!r}")
    return problems


def _load_teacher(spec: str, tok: Any, device: torch.device) -> Any:
    teacher, ttok = load_model(spec)
    if ttok.get_vocab() != tok.get_vocab():
        raise ModelError(f"--teacher {spec}: its tokenizer differs from the student's; distillation compares "
                         f"token distributions, so both must share one tokenizer")
    teacher.eval().requires_grad_(False)
    return teacher.to(device)


def train(cfg: Config, store_path: str | Path | None, plan_path: str | Path, model: str | None, out: str | Path,
          resume: bool = False, init_adapter: str | Path | None = None, teacher: str | None = None,
          layers: list[int] | str | None = None, examples: pl.DataFrame | None = None) -> TrainResult:
    """Fine-tune ``model`` with LoRA on the plan's layers and examples; write RUN (see docs/contracts.md).

    ``examples`` (example_id, domain, prompt, reference) replaces reading the store when given. With ``resume``
    the run continues with its own settings: ``model`` None means the run's base, and any setting that differs
    from the run's (a config key, the plan, the model, layers, teacher) is a TrainingError naming it. A run
    that fails before its first checkpoint leaves no folder behind when this call created it.
    """
    out = Path(out)
    created = not out.exists()
    try:
        return _train(cfg, store_path, plan_path, model, out, resume, init_adapter, teacher, layers, examples)
    except BaseException:
        if created and out.is_dir() and not checkpoints(out) and int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg: Config, store_path: str | Path | None, plan_path: str | Path, model: str | None, out: Path,
           resume: bool, init_adapter: str | Path | None, teacher: str | None, layers: list[int] | str | None,
           examples: pl.DataFrame | None) -> TrainResult:
    t_start = time.time()
    tc = cfg.train
    dist = init_distributed()
    set_threads(tc, dist.world)
    ckpt = _check_out(out, resume)
    prior = run_settings(out) if ckpt is not None else None
    plan = Plan.load(plan_path)
    if prior is not None:
        given = parse_layers(layers, int(prior.get("n_layers") or 0)) if layers is not None else None
        problems = resume_conflicts(prior, cfg, plan_path, resolve_model(model) if model else None, given, teacher)
        if problems:
            raise TrainingError(f"--resume {out}: {len(problems)} setting(s) differ from the run's own: "
                                + "; ".join(problems) + ". A resumed run continues with the settings it started "
                                "with: drop these, or start a new run with another --out")
        model = model or prior.get("base_model_path") or prior.get("base_model")
        layers = layers if layers is not None else prior.get("layers")
        teacher = teacher if teacher is not None else prior.get("teacher")
    if examples is None:
        examples = D.load_examples(store_path)
    spec = model or cfg.model
    base_path = resolve_model(spec).resolve()
    fingerprint = model_fingerprint(base_path)
    if prior is not None and prior.get("base_model_fingerprint") not in (None, fingerprint):
        raise ModelError(f"--resume {out}: the base model at {base_path} does not match the one this run was "
                         f"trained on (fingerprint {fingerprint[:12]}, recorded {prior['base_model_fingerprint'][:12]}:"
                         f" its config or weights differ). Put the original base back, or start a new run")
    base, tok = load_model(base_path, quantize=None if tc.quantize_base == "none" else tc.quantize_base)
    n_layers = int(base.config.num_hidden_layers)
    chosen = choose_layers(plan, layers, n_layers)
    dist.barrier()  # every process has looked at RUN before the first one writes to it
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, plan, examples, tok, out, dist)
    dist.barrier()
    torch.manual_seed(cfg.seed)  # the adapter's initial weights depend on the seed only
    peft_model = attach_lora(base, tc, chosen, plan.layers.rank_pattern if plan.layers else {})
    if init_adapter:
        load_init_adapter(peft_model, init_adapter)
    fuse_lora(peft_model)
    peft_model.to(dist.device).train()
    group_lora(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = make_optimizer(params, tc, dist.device)
    batches = Batches(data.weights, data.lengths, tc.batch_size, cfg.seed, dist)
    steps = total_steps(tc, batches.per_epoch())
    state, metrics = LoopState(), []
    budget = tc.max_minutes * 60

    def clock() -> float:
        return (state.train_seconds + state.eval_seconds) / budget if budget > 0 else 0.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc, steps, clock))
    if ckpt is not None:
        loaded = load_checkpoint(ckpt, peft_model, opt, sched)
        state.__dict__.update(loaded.__dict__)  # the same object: clock() reads it
        batches = Batches(data.weights, data.lengths, tc.batch_size, cfg.seed, dist, state.epoch, state.batch_idx)
        metrics = _truncate_metrics(out, state.step) if dist.main else []
    elif dist.main:
        (out / "metrics.jsonl").write_text("")
    before = LoopState(**state.as_dict())
    # a checkpoint from before wall_seconds was recorded: its train and eval time are a lower bound
    prior_wall = max(before.wall_seconds, before.train_seconds + before.eval_seconds)
    ctx = Ctx(peft_model, opt, sched, tc, dist, tok.pad_token_id,
              _load_teacher(teacher, tok, dist.device) if teacher else None, started=t_start, prior_wall=prior_wall,
              amp=autocast_dtype(tc, dist.device))
    if ctx.amp is not None:
        keep_frozen_casts(peft_model, ctx.amp)
    manifest = {
        "config": config_to_dict(cfg), "base_model": (prior or {}).get("base_model", spec),
        "base_model_path": str(base_path), "base_model_fingerprint": fingerprint,
        "plan": str(Path(plan_path).resolve()), "plan_sha256": file_sha256(plan_path),
        "split_sha256": run_art.split_sha256(data.split), "seed": cfg.seed, "task": data.task, "layers": chosen,
        "n_layers": n_layers, "world_size": dist.world,
        "init_adapter": (prior or {}).get("init_adapter") if prior else (str(init_adapter) if init_adapter else None),
        "teacher": teacher, "system_prompt": tk.DEFAULT_SYSTEM, "versions": _versions(),
        "n_train": len(data.train), "n_val": int((data.split["split"] == "val").sum()),
        "n_val_scored": len(data.val), "n_test": int((data.split["split"] == "test").sum()),
        "truncated": data.truncated, "total_steps": steps,
        "precision": "bf16" if ctx.amp == torch.bfloat16 else "fp32",
    }
    if dist.main and prior is None:
        (out / "checkpoints").mkdir(exist_ok=True)
        (out / "checkpoints" / SETTINGS).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    setup_s = time.time() - t_start
    result = _loop(ctx, data, batches, state, steps, out, metrics, params, manifest)
    session_total = time.time() - t_start
    session = {"resumed_from_step": before.step if ckpt is not None else None, "setup_s": round(setup_s, 2),
               "train_s": round(state.train_seconds - before.train_seconds, 2),
               "eval_s": round(state.eval_seconds - before.eval_seconds, 2), "total_s": round(session_total, 2)}
    # train_s, eval_s and total_s count every session of the run; setup_s and "session" are this one's
    manifest["timings"] = {"setup_s": round(setup_s, 2), "train_s": round(state.train_seconds, 2),
                           "eval_s": round(state.eval_seconds, 2),
                           "total_s": round(prior_wall + session_total, 2), "session": session}
    result.resumed_from = session["resumed_from_step"]
    result.session_steps = state.step - before.step
    result.session_seconds = state.train_seconds - before.train_seconds
    _finish(ctx, out, manifest, result)
    dist.barrier()
    return result


def _validate_and_track(ctx: Ctx, data: RunData, state: LoopState, out: Path, rec: dict[str, Any]) -> None:
    """Validate, record, keep the best adapter, and count validations without improvement."""
    t0 = time.perf_counter()
    val_loss, exact = validate(ctx, data.val, ctx.tc.eval_batch_size)
    state.eval_seconds += time.perf_counter() - t0
    rec.update(val_loss=val_loss, val_exact=exact)
    if val_loss < state.best_val - ctx.tc.min_delta:
        state.best_val, state.best_step, state.bad_evals = val_loss, state.step, 0
        if ctx.dist.main:
            _save_adapter(ctx.model, out / "best-adapter")
    else:
        state.bad_evals += 1


def _nan_stop(ctx: Ctx, state: LoopState, out: Path, manifest: dict[str, Any]) -> None:
    """Keep the last good weights as a checkpoint and stop with a message naming the step."""
    path = None
    if ctx.dist.main:
        path = _checkpoint(ctx, out, state, max(ctx.tc.keep_checkpoints, 1) + 1)
        manifest.update(stopped_early=True, stop_reason=f"non-finite loss at step {state.step + 1}",
                        best_step=state.best_step if state.best_step >= 0 else None)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    raise TrainingError(f"the loss became NaN/inf at step {state.step + 1}; training stopped. The last good "
                        f"weights (after step {state.step}) are in {path or out / 'checkpoints'}. Lower train.lr, "
                        f"check the data for empty answers, or resume from that checkpoint with --resume")


def _time_up(ctx: Ctx, state: LoopState) -> bool:
    """Whether train.max_minutes is spent; every process agrees (any process over budget stops them all)."""
    if ctx.tc.max_minutes <= 0:
        return False
    over = torch.tensor([float(state.train_seconds + state.eval_seconds >= ctx.tc.max_minutes * 60)])
    return bool(ctx.dist.all_sum(over).item() > 0)


def _loop(ctx: Ctx, data: RunData, batches: Batches, state: LoopState, steps: int, out: Path,
          metrics: list[dict[str, Any]], params: list[torch.Tensor], manifest: dict[str, Any]) -> TrainResult:
    """Run optimizer steps until ``steps`` or early stopping; log, validate and checkpoint on the way."""
    tc, dist = ctx.tc, ctx.dist
    stop_reason, stopped_early = f"reached {steps} steps", False
    # a bar on a terminal; written to a file or a pipe (disable=None: no TTY), one plain line per validation instead
    bar = tqdm(total=steps, initial=state.step, disable=None if dist.main else True, desc="train", unit="step",
               dynamic_ncols=True)
    plain = dist.main and bar.disable
    while state.step < steps:
        t0 = time.perf_counter()
        micro = [[data.train[i] for i in next(batches)] for _ in range(tc.grad_accum)]
        s = train_step(ctx, micro, params)
        if not s.finite:
            bar.close()
            _nan_stop(ctx, state, out, manifest)
        state.train_seconds += time.perf_counter() - t0
        state.step, state.epoch, state.batch_idx = state.step + 1, batches.epoch, batches.idx
        state.tokens, state.examples = state.tokens + s.tokens, state.examples + s.examples
        tps = state.tokens / max(state.train_seconds, 1e-9)
        rec = {"step": state.step, "epoch": round(state.epoch + state.batch_idx / max(1, batches.per_epoch()), 4),
               "train_loss": s.loss, "lr": s.lr, "tokens_per_s": round(tps, 2),
               "examples_per_s": round(state.examples / max(state.train_seconds, 1e-9), 3)}
        time_up = _time_up(ctx, state)
        if time_up:
            stop_reason = f"time budget of {tc.max_minutes:g} minutes reached at step {state.step}"
        if data.val and ((tc.eval_every and state.step % tc.eval_every == 0) or state.step == steps or time_up):
            _validate_and_track(ctx, data, state, out, rec)
        metrics.append(rec)
        if dist.main:
            _append_metrics(out, rec)
        if plain and "val_loss" in rec:
            print(f"train: step {state.step}/{steps}  loss {s.loss:.4f}  val_loss {rec['val_loss']:.4f}  "
                  f"{tps:.0f} tok/s", file=sys.stderr, flush=True)
        bar.update(1)
        # with a time budget the bar's own ETA (toward max_steps) means little: show the minutes left
        left = tc.max_minutes - (state.train_seconds + state.eval_seconds) / 60
        bar.set_postfix(loss=f"{s.loss:.3f}", tok_s=f"{tps:.0f}",
                        **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}),
                        **({"budget_left": f"{max(left, 0.0):.1f}min"} if tc.max_minutes > 0 else {}))
        if tc.patience and state.bad_evals >= tc.patience:
            stopped_early = True
            stop_reason = (f"early stopping at step {state.step}: validation loss did not improve for "
                           f"{tc.patience} validations (best {state.best_val:.4f} at step {state.best_step})")
        if dist.main and (stopped_early or time_up or (tc.checkpoint_every and state.step % tc.checkpoint_every == 0)):
            _checkpoint(ctx, out, state, tc.keep_checkpoints)
        if stopped_early or time_up:
            break
    bar.close()
    train_losses = [m["train_loss"] for m in metrics]
    return TrainResult(
        run_dir=out, adapter_dir=out / "adapter", steps=state.step, layers=manifest["layers"],
        best_step=state.best_step if state.best_step >= 0 else None,
        best_val_loss=state.best_val if math.isfinite(state.best_val) else None,
        final_train_loss=train_losses[-1] if train_losses else None, stopped_early=stopped_early,
        stop_reason=stop_reason, train_seconds=state.train_seconds,
        examples_per_s=state.examples / max(state.train_seconds, 1e-9),
        tokens_per_s=state.tokens / max(state.train_seconds, 1e-9), n_train=manifest["n_train"],
        n_val=manifest["n_val"], n_test=manifest["n_test"], metrics=metrics)


def _finish(ctx: Ctx, out: Path, manifest: dict[str, Any], result: TrainResult) -> None:
    """Write RUN/adapter (the best-validated one when kept) and RUN/manifest.json."""
    if not ctx.dist.main:
        return
    best = out / "best-adapter"
    if ctx.tc.keep_best and result.best_step is not None and best.is_dir():
        tmp = out / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best, tmp)
        shutil.rmtree(out / "adapter", ignore_errors=True)
        tmp.rename(out / "adapter")
        manifest["adapter_step"] = result.best_step
    else:
        _save_adapter(ctx.model, out / "adapter")
        manifest["adapter_step"] = result.steps
    manifest.update(
        steps=result.steps, best_step=result.best_step, best_val_loss=result.best_val_loss,
        stopped_early=result.stopped_early, stop_reason=result.stop_reason,
        tokens_per_s=round(result.tokens_per_s, 2), examples_per_s=round(result.examples_per_s, 3),
        peak_memory_mb=round(peak_memory_mb(ctx.dist.device), 1),
    )
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    tmp.replace(out / "manifest.json")
