"""Continual LoRA fine-tuning of GPT-2 over a sequence of domains, with DyLoRA and domain correlation.

Stage t trains the adapters on domain t for ``epochs`` epochs, minimising

    L = CE + lambda_order * L_order + lambda_dc * L_DC

where CE is the next-token loss, L_order the ordering penalty at the active
rank and L_DC = 1 - cos(delta_W of stage t-1, delta_W now) (absent in the
first stage). Every stage after the first cuts the rank at the start of each
epoch as ``rank_schedule`` says; with ``dylora`` on, each step trains a rank
drawn from 1..r (see ``dynamic_rank``). After each epoch the current domain
is evaluated; after each stage, every domain, which fills the matrices
accuracy[t][i] and loss[t][i] that retention and backward transfer are read from.

Each stage starts a fresh AdamW; within a stage, a rank cut keeps the state of
the kept components. Only the adapters of the previous stage are stored for
L_DC, never its data.
"""

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from .dynamic_rank import (DYLORA_MODES, RankSampler, active_rank, check_rank, check_rank_schedule,
                           freeze_leading_grads, scheduled_rank, truncate_adapters)
from .layer import inject_lora, lora_layers
from .metrics import backward_transfer, causal_lm_loss, evaluate, final_minus_own, model_logits, move_batch, retention
from .models import pick_device
from .regularizers import domain_correlation, order_penalty, snapshot_adapters

AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    # model and adapter
    model_name: str = "gpt2"  # a Hugging Face name or a local folder of a GPT-2 checkpoint
    target_modules: tuple = ("c_attn",)  # Conv1D modules that get an adapter
    r_max: int = 64  # adapter width at the start of training
    alpha: float = 32.0  # LoRA scale is alpha / r at the active rank r
    lora_dropout: float = 0.05  # dropout on the adapter's input, training only
    # optimisation (AdamW, constant learning rate, no clipping)
    batch_size: int = 8
    epochs: int = 3  # per domain
    lr: float = 5e-5
    weight_decay: float = 0.01  # torch's AdamW default
    # the continual method
    lambda_order: float = 1e-4  # weight of the ordering penalty, every stage; 0 turns it off
    lambda_dc: float = 0.1  # weight of the domain-correlation loss, stages after the first; 0 turns it off
    dylora: str = "frozen"  # sampled rank per step: "off", "frozen" (official DyLoRA) or "full"
    rank_schedule: tuple = None  # rank per epoch of every stage after the first; () keeps r_max; None halves
    #                              r_max each epoch: (64, 32, 16) for the defaults, the original's schedule
    reset_optimizer_on_rank_change: bool = False  # drop AdamW's moments at a rank cut instead of keeping them
    # evaluation
    eval_batch_size: int = 8
    sweep_ranks: tuple = ()  # after each stage, evaluate its domain at each of these ranks (no retraining)
    log_every: int = 50  # steps between step rows in the history; 0 logs epochs only
    # runtime
    seed: int = 42  # adapter init, data order, dropout and rank sampling
    device: str = ""  # "" picks cuda if available, else cpu
    dtype: str = "float32"  # autocast dtype of the frozen model: "float32" (none) or "bfloat16"

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if self.rank_schedule is None and isinstance(self.r_max, int) and isinstance(self.epochs, int):
            self.rank_schedule = tuple(max(1, self.r_max >> epoch) for epoch in range(max(self.epochs, 0)))
        self.rank_schedule = tuple(self.rank_schedule or ())
        self.sweep_ranks = tuple(self.sweep_ranks)
        positive_ints = {"r_max": self.r_max, "batch_size": self.batch_size, "epochs": self.epochs,
                         "eval_batch_size": self.eval_batch_size}
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r}; expected an integer >= 1")
        if isinstance(self.log_every, bool) or not isinstance(self.log_every, int) or self.log_every < 0:
            raise ValueError(f"TrainConfig.log_every={self.log_every!r}; expected an integer >= 0")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"TrainConfig.alpha={self.alpha!r}; expected a finite number > 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr={self.lr!r}; expected a finite number > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"TrainConfig.lora_dropout={self.lora_dropout!r}; expected a probability in [0, 1)")
        for name in ("weight_decay", "lambda_order", "lambda_dc"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"TrainConfig.{name}={value!r}; expected a finite number >= 0")
        if self.dylora not in DYLORA_MODES:
            raise ValueError(f"TrainConfig.dylora={self.dylora!r}; expected one of {DYLORA_MODES}")
        if self.dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"TrainConfig.dtype={self.dtype!r}; expected one of {tuple(AUTOCAST_DTYPES)}")
        check_rank_schedule(self.rank_schedule, self.r_max, self.epochs)
        for rank in self.sweep_ranks:
            check_rank(rank, self.r_max, f"TrainConfig.sweep_ranks={self.sweep_ranks}")


# The four arms of the comparison: DyLoRA (ordering penalty, sampled rank and
# rank schedule) on or off, crossed with the domain-correlation loss on or off.
_NO_DYLORA = {"lambda_order": 0.0, "dylora": "off", "rank_schedule": ()}
VARIANTS = {
    "lora_only": {**_NO_DYLORA, "lambda_dc": 0.0},
    "dy_only": {"lambda_dc": 0.0},
    "dc_only": dict(_NO_DYLORA),
    "hybrid": {},
}


def variant_config(name, **overrides):
    """The TrainConfig of variant `name` (see VARIANTS); `overrides` set any other field."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected one of {tuple(VARIANTS)}")
    return TrainConfig(**{**VARIANTS[name], **overrides})


class Domain(NamedTuple):
    """One domain of the sequence: map-style data sets whose items hold input_ids, attention_mask, labels [T].

    Any (name, train, eval) triple, such as ``data.load_domain``'s, converts with ``Domain(*triple)``.
    """

    name: str
    train: object
    eval: object


def _as_domain(item):
    if not isinstance(item, (tuple, list)) or len(item) != 3:
        raise ValueError(f"domain {item!r:.80}: expected a (name, train_examples, eval_examples) triple")
    domain = Domain(*item)
    for split in ("train", "eval"):
        if len(getattr(domain, split)) == 0:
            raise ValueError(f"domain {domain.name!r}: the {split} set is empty; expected at least one example")
    return domain


def autocast_context(device, dtype):
    """A fresh autocast context for `dtype` on `device`, or a null context for float32."""
    autocast_dtype = AUTOCAST_DTYPES[dtype]
    if autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype)


def load_model(config):
    """GPT-2 from `config.model_name` with adapters injected (seeded by config.seed), on config's device."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(config.model_name)
    torch.manual_seed(config.seed)
    inject_lora(model, config.target_modules, r_max=config.r_max, alpha=config.alpha, dropout=config.lora_dropout)
    return model.to(pick_device(config.device or None))


@dataclass
class _EpochTotals:
    """Sums kept on the device during an epoch, so the step loop never waits for the host."""

    ce: torch.Tensor
    order: torch.Tensor
    dc: torch.Tensor
    tokens: torch.Tensor
    steps: int = 0

    @classmethod
    def zeros(cls, device):
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(3)),
                   torch.zeros((), dtype=torch.int64, device=device))


@dataclass
class _Stage:
    """What one stage's steps need besides the model."""

    layers: list
    optimizer: torch.optim.Optimizer
    sampler: RankSampler
    snapshot: object  # AdapterSnapshot of the previous stage, or None
    device: torch.device
    config: TrainConfig
    log: object
    history: list = field(default_factory=list)


def _regularizer(stage):
    """lambda_order * L_order + lambda_dc * L_DC at the active rank, as (total or None, order, dc) tensors."""
    config, total = stage.config, None
    order = dc = None
    if config.lambda_order > 0:
        order = order_penalty(stage.layers)
        total = config.lambda_order * order
    if stage.snapshot is not None:
        dc = domain_correlation(stage.layers, stage.snapshot)
        total = config.lambda_dc * dc if total is None else total + config.lambda_dc * dc
    return total, order, dc


def _train_step(model, batch, stage, totals):
    config, layers = stage.config, stage.layers
    rank = layers[0].rank
    sampled = stage.sampler.sample(rank) if config.dylora != "off" else rank
    with active_rank(layers, sampled), autocast_context(stage.device, config.dtype):
        ce = causal_lm_loss(model_logits(model, batch), batch["labels"])
    ce.backward()
    if config.dylora == "frozen":
        freeze_leading_grads(layers, sampled)
    # The regularisers see the whole adapter at the scheduled rank, and their
    # gradient is not masked: DyLoRA's detaching applies to the sampled forward only.
    regularizer, order, dc = _regularizer(stage)
    if regularizer is not None:
        regularizer.backward()
    stage.optimizer.step()
    stage.optimizer.zero_grad(set_to_none=True)
    totals.ce += ce.detach()
    if order is not None:
        totals.order += order.detach()
    if dc is not None:
        totals.dc += dc.detach()
    totals.tokens += batch["attention_mask"].sum()
    totals.steps += 1


def _record(stage, row):
    stage.history.append(row)
    if stage.log is not None:
        stage.log(row)


def _train_epoch(model, loader, stage, where):
    totals = _EpochTotals.zeros(stage.device)
    logged_ce, logged_steps = 0.0, 0
    if stage.device.type == "cuda":
        torch.cuda.synchronize(stage.device)
    start = time.perf_counter()
    model.train()
    for batch in loader:
        _train_step(model, move_batch(batch, stage.device), stage, totals)
        if stage.config.log_every and totals.steps % stage.config.log_every == 0:
            ce_sum = float(totals.ce)  # the one host sync of a logging interval
            _record(stage, {**where, "kind": "step", "step": totals.steps,
                            "train_loss": (ce_sum - logged_ce) / (totals.steps - logged_steps)})
            logged_ce, logged_steps = ce_sum, totals.steps
    if stage.device.type == "cuda":
        torch.cuda.synchronize(stage.device)
    seconds = time.perf_counter() - start
    tokens = int(totals.tokens)
    return {
        "train_loss": float(totals.ce) / totals.steps,
        "order_penalty": float(totals.order) / totals.steps if stage.config.lambda_order > 0 else None,
        "domain_correlation": float(totals.dc) / totals.steps if stage.snapshot is not None else None,
        "steps": totals.steps,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
    }


def _eval_loader(dataset, config):
    # A loader draws a seed from its generator at every pass, from torch's global
    # one if it has none: its own keeps evaluation from shifting the dropout stream.
    return DataLoader(dataset, batch_size=config.eval_batch_size, shuffle=False, generator=torch.Generator())


def _evaluate(model, loader, stage):
    return evaluate(model, loader, stage.device, autocast_context(stage.device, stage.config.dtype))


def run_continual(model, domains, config, log=None):
    """Train `model`'s adapters on `domains` in order; return the history and the metric matrices.

    model: a GPT-2 LM whose target modules already hold LoRAConv1D adapters of
    width config.r_max (see ``load_model``), on any device; it is moved to
    config's device. domains: a sequence of ``Domain`` or (name, train, eval)
    triples. log: called with each history row as it is made.

    Returns a JSON-ready dict: "initial" (each domain before training),
    "accuracy" and "loss" (T x T, [stage][domain]), "retention",
    "loss_change" (final minus own-stage loss of each earlier domain),
    "bwt" (of accuracy), "rank_sweep" and "history" (step and epoch rows).
    """
    domains = [_as_domain(d) for d in domains]
    if not domains:
        raise ValueError("run_continual: no domains given; expected at least one Domain")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("run_continual: the model holds no LoRAConv1D; inject adapters first (load_model)")
    widths = sorted({layer.r_max for layer in layers})
    if widths != [config.r_max]:
        raise ValueError(f"run_continual: the adapters have width {widths}; expected config.r_max={config.r_max}")
    device = pick_device(config.device or None)
    model.to(device)
    torch.manual_seed(config.seed)
    sampler = RankSampler(config.seed)
    eval_loaders = [_eval_loader(d.eval, config) for d in domains]
    stage = _Stage(layers, None, sampler, None, device, config, log)

    initial = [_evaluate(model, loader, stage) for loader in eval_loaders]
    accuracy, loss, sweeps = [], [], []
    for t, domain in enumerate(domains):
        params = [p for p in model.parameters() if p.requires_grad]
        stage.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        train_loader = DataLoader(domain.train, batch_size=config.batch_size, shuffle=True,
                                  generator=torch.Generator().manual_seed(config.seed + t),
                                  pin_memory=device.type == "cuda")  # lets move_batch copy without blocking
        results = [None] * len(domains)
        for epoch in range(config.epochs):
            rank = scheduled_rank(config.rank_schedule, epoch) if t > 0 else None
            if rank is not None and rank < layers[0].r_max:
                truncate_adapters(layers, rank, stage.optimizer, config.reset_optimizer_on_rank_change)
            where = {"stage": t, "domain": domain.name, "epoch": epoch, "rank": layers[0].rank,
                     "trainable_params": sum(p.numel() for p in params)}
            row = {**where, "kind": "epoch", **_train_epoch(model, train_loader, stage, where)}
            results[t] = _evaluate(model, eval_loaders[t], stage)
            _record(stage, {**row, **{f"eval_{k}": v for k, v in results[t].items()}})
        for i, loader in enumerate(eval_loaders):
            if i != t:
                results[i] = _evaluate(model, loader, stage)
        accuracy.append([r["accuracy"] for r in results])
        loss.append([r["loss"] for r in results])
        sweep = {}
        for r in config.sweep_ranks:
            if r <= layers[0].rank:
                with active_rank(layers, r):
                    sweep[r] = _evaluate(model, eval_loaders[t], stage)
        sweeps.append({"stage": t, "domain": domain.name, "by_rank": sweep})
        if config.lambda_dc > 0 and t + 1 < len(domains):
            stage.snapshot = snapshot_adapters(layers)

    return {
        "config": dataclasses.asdict(config),
        "domains": [d.name for d in domains],
        "device": str(device),
        "initial": initial,
        "accuracy": accuracy,
        "loss": loss,
        "retention": retention(accuracy),
        "loss_change": final_minus_own(loss),
        "bwt": backward_transfer(accuracy),
        "rank_sweep": sweeps,
        "history": stage.history,
    }
