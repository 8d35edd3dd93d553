"""Continual LoRA fine-tuning of GPT-2 over a sequence of domains, with DyLoRA and domain correlation.

Stage t trains the adapters on domain t for ``epochs`` epochs, minimising

    L = CE + lambda_order * L_order + lambda_dc * L_DC

where CE is the next-token loss, L_order the ordering penalty at the active
rank and L_DC = 1 - cos(delta_W of stage t-1, delta_W now) (absent in the
first stage). Every stage after the first cuts the rank at the start of each
epoch as ``rank_schedule`` says; with ``dylora`` on, each step trains at a rank
drawn as its mode says (see ``dynamic_rank``). The baselines' terms (L2 toward
the previous adapter, EWC) and replay are weighed in by their own fields. After each epoch the current domain
is evaluated; after each stage, every domain, which fills the matrices
accuracy[t][i] and loss[t][i] that retention and backward transfer are read from.

Each stage starts a fresh AdamW; within a stage, a rank cut keeps the state of
the kept components. Only the adapters of the previous stage are stored for
L_DC, never its data.

``train_stage`` trains one domain; ``run_continual`` runs the sequence on it
and evaluates. An optimizer step may sum ``grad_accum`` micro-batches. The
data order of an epoch is a pure function of (seed, stage, epoch), and every
other source of randomness (torch's generators, the DyLoRA sampler) is saved in
the checkpoints (``checkpoint``), so a run killed at any point and resumed ends
with the metrics of a run never interrupted. Each optimizer step goes through
the non-finite guard (``nonfinite``): a NaN or infinite loss or gradient makes
no update, and stops the run (or is skipped) at the next read of the host. Under torchrun the same loop runs
data-parallel, each process on a shard of every global batch (``distributed``).
"""

import dataclasses
import hashlib
import json
import math
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hybrid_lora.train import distributed
from hybrid_lora.io.adapter_files import named_adapters
from hybrid_lora.train.checkpoint import (CheckpointError, checkpoint_path, load_checkpoint, optimizer_from_checkpoint,
                         optimizer_to_checkpoint, require_equal, rng_from_checkpoint, rng_to_checkpoint,
                         save_checkpoint, snapshot_from_checkpoint, snapshot_to_checkpoint)
from hybrid_lora.train.compiled import compiled_model, loss_function
from hybrid_lora.train.dynamic_rank import (DYLORA_MODES, RankSampler, active_rank, check_rank, check_rank_schedule,
                           freeze_leading_grads, scheduled_rank, step_rank, truncate_adapters)
from hybrid_lora.train.ewc import anchor_from_checkpoint, anchor_to_checkpoint, ewc_penalty, fisher_anchor
from hybrid_lora.nn.layer import inject_lora, lora_layers
from hybrid_lora.train.metrics import backward_transfer, evaluate, final_minus_own, move_batch, retention
from hybrid_lora.io.models import enable_activation_checkpointing, load_causal_lm, pick_device
from hybrid_lora.train.nonfinite import POLICIES, NonFiniteGuard, check_applied, check_evaluation, fused_adamw_supported
from hybrid_lora.train.presets import base_lr, preset_fields
from hybrid_lora.train.replay import with_replay
from hybrid_lora.train.regularizers import DC_MODES, l2_to_previous, order_penalty, snapshot_adapters
from hybrid_lora.nn.scaling import SCALE_RULES

AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    # model and adapter
    model_name: str = "gpt2"  # "embedded", a Hugging Face name or a local checkpoint folder of any causal LM
    target_modules: tuple = ("c_attn",)  # nn.Linear / Conv1D modules that get an adapter: name suffixes, or a
    #                                      regular expression over whole names (peft's target_modules rule)
    r_max: int = 64  # adapter width at the start of training
    alpha: float = 32.0  # LoRA scale at the active rank r: see scale_rule
    scale_rule: str = "rslora"  # "alpha/r" (the original's), "rslora" (alpha / sqrt r) or "fixed" (alpha / r_max)
    lora_dropout: float = 0.05  # dropout on the adapter's input, training only
    # optimisation (AdamW, constant learning rate, no clipping)
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch: batch_size * grad_accum)
    epochs: int = 3  # per domain
    lr: float = None  # None: the base model's own (presets.base_lr): 1e-3 for the embedded base, else 5e-5
    weight_decay: float = 0.01  # torch's AdamW default
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" that step (``nonfinite``)
    # the continual method
    lambda_order: float = 1e-4  # weight of the ordering penalty, every stage; 0 turns it off
    lambda_dc: float = 0.3  # weight of the domain-correlation loss, stages after the first; 0 turns it off
    lambda_l2: float = 0.0  # weight of ||delta_W - delta_W of the previous stage||^2 (a baseline); 0 turns it off
    lambda_ewc: float = 0.0  # weight of EWC on the adapters (a baseline, see ewc); 0 turns it off
    ewc_batches: int = 32  # batches of the previous domain the EWC Fisher is estimated from
    replay_fraction: float = 0.0  # train each stage also on this fraction of every earlier domain (a reference
    #                               that stores old data, unlike the method); 0 turns it off
    dc_mode: str = "delta"  # L_DC over the update matrices ("delta") or the rank-aligned factors ("weights")
    dylora: str = "nested"  # rank per step: "off", "frozen" (official DyLoRA), "full", "nested" (r, r/2, r/4)
    rank_schedule: tuple = None  # rank per epoch of every stage after the first; () keeps r_max; None halves
    #                              r_max each epoch: (64, 32, 16) for the defaults, the original's schedule
    reset_optimizer_on_rank_change: bool = False  # drop AdamW's moments at a rank cut instead of keeping them
    # evaluation
    eval_batch_size: int = 8
    sweep_ranks: tuple = None  # after each stage, evaluate its domain at these ranks (no retraining);
    #                            None: 1, 2, 4, ... up to the adapter's rank, and that rank; (): no sweep
    log_every: int = 50  # optimizer steps between step rows in the history; 0 logs epochs only
    progress: bool = True  # a tqdm bar per epoch with the loss and rank (shown on a terminal only)
    # checkpoints (written only when run_continual gets a checkpoint_dir)
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: at the end of each epoch and stage only
    # runtime
    seed: int = 42  # adapter init, data order, dropout and rank sampling
    device: str = ""  # "" picks cuda if available, else cpu
    dtype: str = "auto"  # autocast dtype: "float32" (none), "bfloat16", or "auto": bfloat16 on CUDA, else float32
    compile: bool = False  # the model's forward and backward under torch.compile (see ``compiled``)
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if self.lr is None:
            self.lr = base_lr(self.model_name)
        if self.rank_schedule is None and isinstance(self.r_max, int) and isinstance(self.epochs, int):
            self.rank_schedule = tuple(max(1, self.r_max >> epoch) for epoch in range(max(self.epochs, 0)))
        self.rank_schedule = tuple(self.rank_schedule or ())
        if self.sweep_ranks is not None:
            self.sweep_ranks = tuple(self.sweep_ranks)
        positive_ints = {"r_max": self.r_max, "batch_size": self.batch_size, "epochs": self.epochs,
                         "eval_batch_size": self.eval_batch_size, "grad_accum": self.grad_accum,
                         "ewc_batches": self.ewc_batches}
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r}; expected an integer >= 1")
        for name in ("log_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name}={value!r}; expected an integer >= 0")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"TrainConfig.alpha={self.alpha!r}; expected a finite number > 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr={self.lr!r}; expected a finite number > 0")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"TrainConfig.replay_fraction={self.replay_fraction!r}; expected a fraction in [0, 1)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"TrainConfig.lora_dropout={self.lora_dropout!r}; expected a probability in [0, 1)")
        for name in ("weight_decay", "lambda_order", "lambda_dc", "lambda_l2", "lambda_ewc"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"TrainConfig.{name}={value!r}; expected a finite number >= 0")
        if not isinstance(self.compile, bool):
            raise ValueError(f"TrainConfig.compile={self.compile!r}; expected True or False")
        if self.dylora not in DYLORA_MODES:
            raise ValueError(f"TrainConfig.dylora={self.dylora!r}; expected one of {DYLORA_MODES}")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"TrainConfig.scale_rule={self.scale_rule!r}; expected one of {SCALE_RULES}")
        if self.dc_mode not in DC_MODES:
            raise ValueError(f"TrainConfig.dc_mode={self.dc_mode!r}; expected one of {tuple(DC_MODES)}")
        if self.on_nonfinite not in POLICIES:
            raise ValueError(f"TrainConfig.on_nonfinite={self.on_nonfinite!r}; expected one of {POLICIES}")
        if self.dtype != "auto" and self.dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"TrainConfig.dtype={self.dtype!r}; expected one of {('auto', *AUTOCAST_DTYPES)}")
        check_rank_schedule(self.rank_schedule, self.r_max, self.epochs)
        for rank in self.sweep_ranks or ():
            check_rank(rank, self.r_max, f"TrainConfig.sweep_ranks={self.sweep_ranks}")


# The four arms of the comparison: DyLoRA (ordering penalty, sampled rank and
# rank schedule) on or off, crossed with the domain-correlation loss on or off.
_NO_DYLORA = {"lambda_order": 0.0, "dylora": "off", "rank_schedule": ()}
VARIANTS = {
    "lora_only": {**_NO_DYLORA, "lambda_dc": 0.0},
    "dy_only": {"lambda_dc": 0.0},
    "dc_only": dict(_NO_DYLORA),
    "hybrid": {},
    "l2": {**_NO_DYLORA, "lambda_dc": 0.0, "lambda_l2": 1.0},  # baseline: L2 toward the previous adapter
    "ewc": {**_NO_DYLORA, "lambda_dc": 0.0, "lambda_ewc": 1e4},  # baseline: EWC on the adapters
    "replay": {**_NO_DYLORA, "lambda_dc": 0.0, "replay_fraction": 0.02},  # reference: stores 2 % of old data
}


def variant_config(name, preset="default", **overrides):
    """The TrainConfig of variant `name` (see VARIANTS) over `preset` (see ``presets``); `overrides` set any
    other field and win over both."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected one of {tuple(VARIANTS)}")
    return TrainConfig(**{**preset_fields(preset), **VARIANTS[name], **overrides})


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


def resolved_dtype(config, device):
    """config.dtype with "auto" resolved: bfloat16 on CUDA, float32 elsewhere."""
    if config.dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return config.dtype


def autocast_context(device, dtype):
    """A fresh autocast context for `dtype` on `device`, or a null context for float32."""
    autocast_dtype = AUTOCAST_DTYPES[dtype]
    if autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype)


def load_model(config):
    """The causal LM `config.model_name` with adapters injected (seeded by config.seed), on config's device.

    On CUDA with bfloat16 autocast, the frozen weight and bias of every adapted
    layer are stored in bf16, so the fused kernels read them as they are instead
    of casting W at every step; the adapters stay fp32. The rest of the model
    keeps fp32 (LayerNorms, embeddings and the residual stream need the range).
    """
    device = pick_device(config.device or None)
    model = load_causal_lm(config.model_name)
    torch.manual_seed(config.seed)
    layers = inject_lora(model, _target_modules(config.target_modules), r_max=config.r_max, alpha=config.alpha,
                         dropout=config.lora_dropout, scale_rule=config.scale_rule)
    if device.type == "cuda" and resolved_dtype(config, device) == "bfloat16":
        for layer in layers:
            layer.weight.data = layer.weight.data.to(torch.bfloat16)
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(torch.bfloat16)
    return model.to(device)


def _target_modules(targets):
    """One string is a regular expression over whole module names (as peft reads it); several are names."""
    return targets[0] if len(targets) == 1 and not re.fullmatch(r"[\w.]+", targets[0]) else list(targets)


def epoch_order(size, seed, stage, epoch):
    """The order of a stage's `size` training examples in one epoch: a permutation that is a pure function of
    (seed, stage, epoch), so a resumed run reads the same order without carrying a generator along."""
    key = hashlib.sha256(f"{seed}/{stage}/{epoch}".encode()).digest()
    return torch.randperm(size, generator=torch.Generator().manual_seed(int.from_bytes(key[:8], "little")))


@dataclass
class TrainingState:
    """Everything a run carries across steps, epochs and stages: what a checkpoint saves besides the adapters.

    (stage, epoch, batch) is what comes next: the micro-batch `batch` of epoch
    `epoch` of stage `stage`; epoch == config.epochs means the stage's epochs are
    done and its end-of-stage evaluation is not.
    """

    sampler: RankSampler
    stage: int = 0
    epoch: int = 0
    batch: int = 0
    global_step: int = 0  # optimizer steps over the whole run
    history: list = field(default_factory=list)
    initial: list = None  # each domain before training
    accuracy: list = field(default_factory=list)  # rows R[t] of finished stages
    loss: list = field(default_factory=list)
    rank_sweep: list = field(default_factory=list)
    snapshot: object = None  # AdapterSnapshot for L_DC in the current stage, or None
    ewc: object = None  # EWCAnchor of the earlier stages, or None
    own_eval: dict = None  # the current domain's eval after the latest epoch
    epoch_totals: object = None  # _EpochTotals of the epoch in progress, when resuming inside one
    optimizer_state: tuple = None  # (tensors, param groups) of the stage in progress, when resuming
    checkpointer: object = None  # _Checkpointer or None


@dataclass
class _EpochTotals:
    """Sums kept on the device during an epoch, so the step loop never waits for the host."""

    ce: torch.Tensor
    order: torch.Tensor
    dc: torch.Tensor
    tokens: torch.Tensor
    skipped: torch.Tensor  # steps skipped as non-finite (their losses are not in the sums)
    steps: int = 0
    logged_ce: float = 0.0  # ce, steps and skipped steps at the latest step row
    logged_steps: int = 0
    logged_skipped: int = 0
    seconds: float = 0.0  # training time of the epoch before a resume

    @classmethod
    def zeros(cls, device):
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(3)),
                   *(torch.zeros((), dtype=torch.int64, device=device) for _ in range(2)))

    def tensors(self):
        return {"totals.ce": self.ce, "totals.order": self.order, "totals.dc": self.dc, "totals.tokens": self.tokens,
                "totals.skipped": self.skipped}

    def scalars(self):
        return {"steps": self.steps, "logged_ce": self.logged_ce, "logged_steps": self.logged_steps,
                "logged_skipped": self.logged_skipped, "seconds": self.seconds}


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
    parallel: distributed.DataParallel = field(default_factory=distributed.current)
    guard: NonFiniteGuard = None
    ewc: object = None  # EWCAnchor of the earlier stages, or None
    loss: object = None  # (model, batch) -> (CE, tokens), eager or compiled (``compiled.loss_function``)


def _regularizer(stage):
    """lambda_order * L_order + lambda_dc * L_DC at the active rank, as (total or None, order, dc) tensors."""
    config, total = stage.config, None
    order = dc = None
    if config.lambda_order > 0:
        order = order_penalty(stage.layers)
        total = config.lambda_order * order
    if stage.snapshot is not None and config.lambda_dc > 0:
        dc = DC_MODES[config.dc_mode](stage.layers, stage.snapshot)
        total = config.lambda_dc * dc if total is None else total + config.lambda_dc * dc
    if stage.ewc is not None and config.lambda_ewc > 0:
        ewc = config.lambda_ewc * ewc_penalty(stage.layers, stage.ewc)
        total = ewc if total is None else total + ewc
    if stage.snapshot is not None and config.lambda_l2 > 0:
        l2 = config.lambda_l2 * l2_to_previous(stage.layers, stage.snapshot)
        total = l2 if total is None else total + l2
    return total, order, dc


def _train_step(model, micro_batches, stage, totals):
    """One optimizer step over `micro_batches` (1..grad_accum of them), each CE weighted 1 / their number.

    One DyLoRA rank is drawn per optimizer step, as for one large batch; the
    regularisers do not depend on the data and are added once.
    """
    config, layers, parallel = stage.config, stage.layers, stage.parallel
    rank = layers[0].rank
    sampled = step_rank(config.dylora, stage.sampler, rank)
    step_ce = None
    with active_rank(layers, sampled):
        for i, batch in enumerate(micro_batches):
            if "first_example" in batch:  # this process's shard: dropout masks of the global micro-batch's rows
                for layer in layers:
                    layer.set_dropout_row_offset(batch["first_example"] * batch["input_ids"].shape[1])
            # With several processes, gradients are averaged once per step, after the last micro-batch.
            with parallel.sync_gradients(model, i == len(micro_batches) - 1):
                with autocast_context(stage.device, resolved_dtype(config, stage.device)):
                    ce, tokens = stage.loss(model, batch)
                    ce = ce / len(micro_batches)
                parallel.backward(ce)
            step_ce = ce.detach() if step_ce is None else step_ce + ce.detach()
            totals.tokens += tokens
    if config.dylora == "frozen":
        freeze_leading_grads(layers, sampled)
    # The regularisers see the whole adapter at the scheduled rank, and their
    # gradient is not masked: DyLoRA's detaching applies to the sampled forward only.
    regularizer, order, dc = _regularizer(stage)
    if regularizer is not None:
        regularizer.backward()
    # optimizer.step(), skipped on the device if the loss or a gradient is not finite
    guard = stage.guard
    guard.step(step_ce if regularizer is None else step_ce + regularizer.detach())
    stage.optimizer.zero_grad(set_to_none=True)
    totals.ce += guard.kept(step_ce)
    if order is not None:
        totals.order += guard.kept(order.detach())
    if dc is not None:
        totals.dc += guard.kept(dc.detach())
    totals.skipped += guard.skip.long()  # the same on every process
    totals.steps += 1


def _record(stage, row):
    stage.history.append(row)
    if stage.log is not None and row["kind"] in ("step", "epoch"):
        stage.log(row)


def _check_finite(stage, where, state, totals):
    """Read the non-finite guard's flags; under "stop", raise if a step since the last read was not finite."""
    stage.guard.poll(where["stage"], where["domain"], where["epoch"], state.global_step - totals.steps,
                     stage.config.lr)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_epoch(model, dataset, stage, where, state):
    """Train one epoch from micro-batch state.batch on; return the epoch row's training figures."""
    config, device = stage.config, stage.device
    order = epoch_order(len(dataset), config.seed, where["stage"], where["epoch"])
    start_batch = state.batch  # counted in global micro-batches, whatever the number of processes
    loader = stage.parallel.epoch_loader(dataset, order, start_batch, config.batch_size, device.type == "cuda")
    n_batches = math.ceil(len(dataset) / config.batch_size)
    n_steps = math.ceil(n_batches / config.grad_accum)
    totals = state.epoch_totals or _EpochTotals.zeros(device)
    state.epoch_totals = None
    show = config.progress and stage.parallel.is_main  # one bar for the group
    bar = tqdm(total=n_steps, initial=totals.steps, disable=None if show else True, leave=False,
               desc=f"stage {where['stage']} ({where['domain']}) epoch {where['epoch']}", unit="step")
    bar.set_postfix(rank=stage.layers[0].rank)
    _sync(device)
    start = time.perf_counter()
    model.train()
    group, batch_index = [], start_batch
    for batch in loader:
        group.append(move_batch(batch, device))
        if stage.parallel.world > 1:
            group[-1]["first_example"] = stage.parallel.shard_start(batch_index, config.batch_size, len(dataset))
        batch_index += 1
        if len(group) < config.grad_accum and batch_index < n_batches:
            continue
        _train_step(model, group, stage, totals)
        group = []
        state.global_step += 1
        bar.update()
        if config.log_every and totals.steps % config.log_every == 0:
            _check_finite(stage, where, state, totals)  # the host sync of a logging interval
            ce_sum, skipped = float(stage.parallel.sum(totals.ce)), int(totals.skipped)
            applied = (totals.steps - totals.logged_steps) - (skipped - totals.logged_skipped)
            train_loss = (ce_sum - totals.logged_ce) / applied if applied else math.nan
            bar.set_postfix(loss=f"{train_loss:.4f}", rank=stage.layers[0].rank)
            _record(stage, {**where, "kind": "step", "step": totals.steps, "global_step": state.global_step,
                            "train_loss": train_loss, "skipped_steps": skipped - totals.logged_skipped})
            totals.logged_ce, totals.logged_steps, totals.logged_skipped = ce_sum, totals.steps, skipped
        if (state.checkpointer is not None and config.checkpoint_every
                and state.global_step % config.checkpoint_every == 0 and batch_index < n_batches):
            _check_finite(stage, where, state, totals)
            _sync(device)
            totals.seconds += time.perf_counter() - start
            state.batch = batch_index
            state.checkpointer.save(state, stage.optimizer, totals)
            start = time.perf_counter()
    _sync(device)
    bar.close()
    seconds = totals.seconds + time.perf_counter() - start
    _check_finite(stage, where, state, totals)
    tokens, skipped = int(stage.parallel.sum(totals.tokens)), int(totals.skipped)
    applied = totals.steps - skipped
    check_applied(applied, totals.steps, where["stage"], where["domain"], where["epoch"], config.lr)
    return {
        "train_loss": float(stage.parallel.sum(totals.ce)) / applied,
        "order_penalty": float(totals.order) / applied if config.lambda_order > 0 else None,
        "domain_correlation": (float(totals.dc) / applied
                               if stage.snapshot is not None and config.lambda_dc > 0 else None),
        "steps": totals.steps,
        "skipped_steps": skipped,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
    }


def _eval_loader(dataset, config):
    # A loader draws a seed from its generator at every pass, from torch's global
    # one if it has none: its own keeps evaluation from shifting the dropout stream.
    return DataLoader(distributed.current().eval_shard(dataset), batch_size=config.eval_batch_size, shuffle=False,
                      generator=torch.Generator())


def _evaluate(model, loader, device, config):
    """The loader's shard evaluated here, its sums reduced over the processes."""
    return evaluate(model, loader, device, autocast_context(device, resolved_dtype(config, device)),
                    reduce=distributed.current().sum)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _rank_row(stage, where, previous_rank, params):
    _record(stage, {**where, "kind": "rank", "previous_rank": previous_rank, "rank": stage.layers[0].rank,
                    "trainable_params": sum(p.numel() for p in params)})


def train_stage(model, domain, config, *, stage=0, snapshot=None, log=None, state=None):
    """Train `model`'s adapters on one domain for config.epochs epochs; return its eval after the last epoch.

    stage: the domain's index in the sequence. Stages after the first cut the
    rank at the start of each epoch as config.rank_schedule says. snapshot: the
    AdapterSnapshot L_DC compares against (None: no L_DC). log: called with each
    step and epoch row. state: a TrainingState to continue (``run_continual``
    passes its own, positioned by a checkpoint when resuming); None starts the
    stage afresh. Each stage has its own AdamW. The rows (step, epoch, and one
    "rank" row with the trainable-parameter count at the stage start and after
    each cut) go to state.history.
    """
    domain = _as_domain(domain)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("train_stage: the model holds no LoRAConv1D; inject adapters first (load_model)")
    if state is None:
        state = TrainingState(RankSampler(config.seed), stage=stage)
    if state.stage != stage:
        raise ValueError(f"train_stage: the training state stands at stage {state.stage}; expected stage {stage}")
    device = pick_device(config.device or None)
    parallel = distributed.current()
    parallel.check_batch_size(config.batch_size, "TrainConfig.batch_size")
    model.to(device)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    params = _trainable(model)
    # The fused AdamW skips a step on the device flag of the non-finite guard (``nonfinite``).
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=fused_adamw_supported(device) or None)
    if state.optimizer_state is not None:
        optimizer_from_checkpoint(optimizer, *state.optimizer_state)
        state.optimizer_state = None
    guard = NonFiniteGuard(optimizer, device, config.on_nonfinite, state.global_step,
                           reduce=parallel.sum if parallel.world > 1 else None)
    run = _Stage(layers, optimizer, state.sampler, snapshot, device, config, log, state.history, parallel, guard,
                 state.ewc, loss_function(config, parallel))
    stepped = compiled_model(model, config, parallel)  # what DDP wraps: the model, compiled under torchrun
    wrapped = parallel.wrap(stepped, device)
    eval_loader = _eval_loader(domain.eval, config)
    for epoch in range(state.epoch, config.epochs):
        where = {"stage": stage, "domain": domain.name, "epoch": epoch}
        if state.batch == 0:  # a fresh epoch (a resumed one was cut before its checkpoint)
            previous = layers[0].rank
            rank = scheduled_rank(config.rank_schedule, epoch) if stage > 0 else None
            if rank is not None and rank < layers[0].r_max:
                # Every process cuts here alike (the schedule is a function of the epoch). The cut makes new
                # adapter Parameters: DDP, whose buckets hold the old ones, is built again, and the compiled
                # model recompiles once for the new width at its next call.
                truncate_adapters(layers, rank, optimizer, config.reset_optimizer_on_rank_change)
                params = _trainable(model)
                wrapped = parallel.wrap(stepped, device)
            if epoch == 0 or layers[0].rank != previous:
                _rank_row(run, where, previous, params)
        where = {**where, "rank": layers[0].rank, "trainable_params": sum(p.numel() for p in params)}
        row = {**where, "kind": "epoch", **_train_epoch(wrapped, domain.train, run, where, state)}
        state.own_eval = _evaluate(model, eval_loader, device, config)
        check_evaluation(state.own_eval["loss"], stage, domain.name, epoch, config.lr)
        _record(run, {**row, **{f"eval_{k}": v for k, v in state.own_eval.items()}})
        state.epoch, state.batch = epoch + 1, 0
        if state.checkpointer is not None:
            state.checkpointer.save(state, optimizer)
    return state.own_eval


def default_sweep_ranks(rank):
    """1, 2, 4, ... up to `rank`, and `rank` itself."""
    return tuple(sorted({1 << k for k in range(rank.bit_length())} | {rank}))


class _Checkpointer:
    """Saves the run to one checkpoint file and puts a run back from it (see ``checkpoint``)."""

    IGNORED_FIELDS = ("progress", "checkpoint_every", "gradient_checkpointing")  # settings that change no result

    def __init__(self, directory, model, domains, config, device):
        self.directory, self.model, self.device = directory, model, device
        self.parallel = distributed.current()
        self.path = checkpoint_path(directory)
        self.config = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(config))).items()
                       if k not in self.IGNORED_FIELDS}
        self.layers = {name: [layer.in_features, layer.out_features]
                       for name, layer in named_adapters(model)}
        self.data = {f"{i}:{d.name}": _fingerprint(d) for i, d in enumerate(domains)}

    def save(self, state, optimizer, totals=None):
        """Write the checkpoint from rank 0; every process calls this (the epoch sums are reduced over them)."""
        totals_tensors = {}
        if totals is not None:
            totals_tensors = totals.tensors()
            for key in ("totals.ce", "totals.tokens"):  # per-process shares; the other sums agree everywhere
                totals_tensors[key] = self.parallel.sum(totals_tensors[key])
        if not self.parallel.is_main:
            return
        tensors = {}
        for name, layer in named_adapters(self.model):
            tensors[f"adapter.{name}.lora_a"] = layer.lora_a
            tensors[f"adapter.{name}.lora_b"] = layer.lora_b
        optimizer_tensors, param_groups = optimizer_to_checkpoint(optimizer) if optimizer is not None else ({}, None)
        tensors.update(optimizer_tensors)
        tensors.update(rng_to_checkpoint([self.device]))
        tensors["rng.rank_sampler"] = state.sampler.generator.get_state()
        snapshot_scales = None
        if state.snapshot is not None:
            snapshot_tensors, snapshot_scales = snapshot_to_checkpoint(state.snapshot)
            tensors.update(snapshot_tensors)
        if state.ewc is not None:
            tensors.update(anchor_to_checkpoint(state.ewc))
        tensors.update(totals_tensors)
        progress = {
            "stage": state.stage, "epoch": state.epoch, "batch": state.batch, "global_step": state.global_step,
            "rank": named_adapters(self.model)[0][1].rank, "history": state.history, "initial": state.initial,
            "accuracy": state.accuracy, "loss": state.loss, "rank_sweep": state.rank_sweep,
            "own_eval": state.own_eval, "totals": totals.scalars() if totals is not None else None,
            "snapshot_scales": snapshot_scales, "param_groups": param_groups,
        }
        save_checkpoint(self.directory, tensors, {"config": self.config, "layers": self.layers, "data": self.data,
                                                  "progress": progress})

    def restore(self, state):
        """Put the adapters, generators and `state` back as the checkpoint has them."""
        tensors, meta = self.parallel.from_main(lambda: load_checkpoint(self.directory))
        require_equal("configuration", meta["config"], self.config, self.path)
        require_equal("model (adapted layers: [in, out] features)", meta["layers"], self.layers, self.path)
        require_equal("data (domain: examples and content digest)", meta["data"], self.data, self.path)
        progress = meta["progress"]
        adapters = named_adapters(self.model)
        rank = progress["rank"]
        with torch.no_grad():
            for name, layer in adapters:
                a, b = tensors[f"adapter.{name}.lora_a"], tensors[f"adapter.{name}.lora_b"]
                if a.shape[1] > layer.r_max or a.shape != (layer.in_features, a.shape[1]) or b.shape[0] != a.shape[1]:
                    raise CheckpointError(f"checkpoint {str(self.path)!r}: {name} has adapters {tuple(a.shape)} and "
                                          f"{tuple(b.shape)}; the model's are {tuple(layer.lora_a.shape)} and "
                                          f"{tuple(layer.lora_b.shape)}")
                if a.shape[1] < layer.r_max:
                    layer.truncate_(a.shape[1])
                layer.lora_a.copy_(a)
                layer.lora_b.copy_(b)
                layer.set_rank(rank)
        for key in ("stage", "epoch", "batch", "global_step", "history", "initial", "accuracy", "loss", "own_eval"):
            setattr(state, key, progress[key])
        # JSON keys are strings; the sweep is keyed by rank.
        state.rank_sweep = [{**row, "by_rank": {int(r): v for r, v in row["by_rank"].items()}}
                            for row in progress["rank_sweep"]]
        if progress["snapshot_scales"] is not None:
            state.snapshot = snapshot_from_checkpoint(tensors, progress["snapshot_scales"], self.device)
        if progress["param_groups"] is not None and state.epoch < self.config["epochs"]:
            state.optimizer_state = ({k: v for k, v in tensors.items() if k.startswith("optimizer.")},
                                     progress["param_groups"])
        if progress["totals"] is not None:
            totals = {k.split(".", 1)[1]: v.to(self.device) for k, v in tensors.items() if k.startswith("totals.")}
            if not self.parallel.is_main:  # the saved sums are the group's: rank 0 carries them on
                totals["ce"], totals["tokens"] = torch.zeros_like(totals["ce"]), torch.zeros_like(totals["tokens"])
            state.epoch_totals = _EpochTotals(**totals, **progress["totals"])
        state.ewc = anchor_from_checkpoint(tensors, self.device)
        state.sampler.generator.set_state(tensors["rng.rank_sampler"])
        rng_from_checkpoint(tensors)


def _fingerprint(domain):
    """[train size, eval size, sha256 of every example's tensors]: what tells one domain's data from another's."""
    h = hashlib.sha256()
    for split in (domain.train, domain.eval):
        for example in split:
            for key in ("input_ids", "attention_mask", "labels"):
                h.update(torch.as_tensor(example[key]).cpu().numpy().tobytes())
    return [len(domain.train), len(domain.eval), h.hexdigest()[:32]]


def run_continual(model, domains, config, log=None, checkpoint_dir=None, resume=False):
    """Train `model`'s adapters on `domains` in order; return the history and the metric matrices.

    model: a GPT-2 LM whose target modules already hold LoRAConv1D adapters of
    width config.r_max (see ``load_model``), on any device; it is moved to
    config's device. domains: a sequence of ``Domain`` or (name, train, eval)
    triples. log: called with each step and epoch row as it is made.
    checkpoint_dir: a folder for the run's checkpoint, written every
    config.checkpoint_every optimizer steps and at the end of each epoch and
    stage; None writes none. resume: continue from the checkpoint in
    checkpoint_dir (a fresh start if there is none yet); a checkpoint of another
    configuration, model or data raises CheckpointError. Without resume, an
    existing checkpoint is refused rather than overwritten.

    Returns a JSON-ready dict: "initial" (each domain before training),
    "accuracy" and "loss" (T x T, [stage][domain]), "retention",
    "loss_change" (final minus own-stage loss of each earlier domain),
    "bwt" (of accuracy), "rank_sweep" and "history" (step, epoch and rank rows).
    """
    domains = [_as_domain(d) for d in domains]
    if not domains:
        raise ValueError("run_continual: no domains given; expected at least one Domain")
    if config.replay_fraction > 0:
        domains = [Domain(*d) for d in with_replay(domains, config.replay_fraction, config.seed)]
    layers = lora_layers(model)
    if not layers:
        raise ValueError("run_continual: the model holds no LoRAConv1D; inject adapters first (load_model)")
    widths = sorted({layer.r_max for layer in layers})
    if widths != [config.r_max]:
        raise ValueError(f"run_continual: the adapters have width {widths}; expected config.r_max={config.r_max}")
    if resume and checkpoint_dir is None:
        raise ValueError("run_continual: resume=True needs a checkpoint_dir to resume from")
    device = pick_device(config.device or None)
    model.to(device)
    torch.manual_seed(config.seed)
    state = TrainingState(RankSampler(config.seed))
    if checkpoint_dir is not None:
        state.checkpointer = _Checkpointer(checkpoint_dir, model, domains, config, device)
        if distributed.current().from_main(state.checkpointer.path.exists):
            if not resume:
                raise ValueError(f"run_continual: {str(state.checkpointer.path)!r} exists; pass resume=True to "
                                 "continue it, or give another checkpoint_dir")
            state.checkpointer.restore(state)
    eval_loaders = [_eval_loader(d.eval, config) for d in domains]

    if state.initial is None:
        state.initial = [_evaluate(model, loader, device, config) for loader in eval_loaders]
    for t in range(state.stage, len(domains)):
        own = train_stage(model, domains[t], config, stage=t, snapshot=state.snapshot, log=log, state=state)
        results = [own if i == t else _evaluate(model, loader, device, config) for i, loader in enumerate(eval_loaders)]
        state.accuracy.append([r["accuracy"] for r in results])
        state.loss.append([r["loss"] for r in results])
        rank = layers[0].rank
        sweep_ranks = default_sweep_ranks(rank) if config.sweep_ranks is None else config.sweep_ranks
        sweep = {}
        for r in sweep_ranks:
            if r <= rank:
                with active_rank(layers, r):
                    sweep[r] = _evaluate(model, eval_loaders[t], device, config)
        state.rank_sweep.append({"stage": t, "domain": domains[t].name, "by_rank": sweep})
        if (config.lambda_dc > 0 or config.lambda_l2 > 0) and t + 1 < len(domains):
            state.snapshot = snapshot_adapters(layers)
        if config.lambda_ewc > 0 and t + 1 < len(domains):
            state.ewc = fisher_anchor(model, layers, domains[t].train, config.ewc_batches, config.batch_size, device,
                                      previous=state.ewc,
                                      autocast=autocast_context(device, resolved_dtype(config, device)))
        state.stage, state.epoch, state.batch, state.own_eval = t + 1, 0, 0, None
        if state.checkpointer is not None:
            state.checkpointer.save(state, None)

    return {
        "config": dataclasses.asdict(config),
        "domains": [d.name for d in domains],
        "device": str(device),
        "initial": state.initial,
        "accuracy": state.accuracy,
        "loss": state.loss,
        "retention": retention(state.accuracy),
        "loss_change": final_minus_own(state.loss),
        "bwt": backward_transfer(state.accuracy),
        "rank_sweep": state.rank_sweep,
        "history": state.history,
    }
