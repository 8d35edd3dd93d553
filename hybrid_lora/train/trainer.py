"""Continual LoRA fine-tuning of a causal LM over a sequence of domains, with DyLoRA and domain correlation.

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
and evaluates. The settings are ``config.TrainConfig``, what carries over from
step to step is ``state``, and ``checkpointer`` saves and restores a run. An optimizer step may sum ``grad_accum`` micro-batches. The
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
import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hybrid_lora.io.models import enable_activation_checkpointing, pick_device
from hybrid_lora.nn.layer import lora_layers
from hybrid_lora.train import distributed
from hybrid_lora.train.checkpoint import optimizer_from_checkpoint
from hybrid_lora.train.checkpointer import Checkpointer
from hybrid_lora.train.compiled import compiled_model, loss_function
from hybrid_lora.train.config import TrainConfig, autocast_context, resolved_dtype
from hybrid_lora.train.dynamic_rank import (RankSampler, active_rank, doubling_ranks, freeze_leading_grads,
                                            scheduled_rank, step_ranks, truncate_adapters)
from hybrid_lora.train.ewc import ewc_penalty, fisher_anchor
from hybrid_lora.train.metrics import backward_transfer, evaluate, final_minus_own, move_batch, retention
from hybrid_lora.train.nonfinite import NonFiniteGuard, check_applied, check_evaluation, fused_adamw_supported
from hybrid_lora.train.rank_curve import rank_curves
from hybrid_lora.train.regularizers import DC_MODES, l2_to_previous, order_penalty, snapshot_adapters
from hybrid_lora.train.replay import with_replay
from hybrid_lora.train.state import EpochTotals, TrainingState


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


def epoch_order(size, seed, stage, epoch):
    """The order of a stage's `size` training examples in one epoch: a permutation that is a pure function of
    (seed, stage, epoch), so a resumed run reads the same order without carrying a generator along."""
    key = hashlib.sha256(f"{seed}/{stage}/{epoch}".encode()).digest()
    return torch.randperm(size, generator=torch.Generator().manual_seed(int.from_bytes(key[:8], "little")))


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

    One DyLoRA rank is drawn per optimizer step, as for one large batch
    ('multi-rank' runs every micro-batch at each of its ranks, each CE weighted
    1 / the number of ranks too); the regularisers do not depend on the data
    and are added once.
    """
    config, layers, parallel = stage.config, stage.layers, stage.parallel
    rank = layers[0].rank
    ranks = step_ranks(config.dylora, stage.sampler, rank)
    step_ce = None
    last = (len(ranks) - 1, len(micro_batches) - 1)
    for j, sampled in enumerate(ranks):
        with active_rank(layers, sampled):
            for i, batch in enumerate(micro_batches):
                if "first_example" in batch:  # this process's shard: dropout masks of the global micro-batch's rows
                    for layer in layers:
                        layer.set_dropout_row_offset(batch["first_example"] * batch["input_ids"].shape[1])
                # With several processes, gradients are averaged once per step, after the last backward.
                with parallel.sync_gradients(model, (j, i) == last):
                    with autocast_context(stage.device, resolved_dtype(config, stage.device)):
                        ce, tokens = stage.loss(model, batch)
                        ce = ce / (len(micro_batches) * len(ranks))
                    parallel.backward(ce)
                step_ce = ce.detach() if step_ce is None else step_ce + ce.detach()
                if j == 0:  # the step's data, counted once whatever the number of ranks
                    totals.tokens += tokens
    if config.dylora == "frozen":
        freeze_leading_grads(layers, ranks[0])
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
    totals = state.epoch_totals or EpochTotals.zeros(device)
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
        raise ValueError("train_stage: the model holds no LoRA layer; inject adapters first (load_model)")
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
                 state.ewc, loss_function(config, parallel, stage + 1))
    # What DDP wraps: the model, compiled under torchrun.
    stepped = compiled_model(model, config, parallel, stage + 1)
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
    return doubling_ranks(rank)


def run_continual(model, domains, config, log=None, checkpoint_dir=None, resume=False):
    """Train `model`'s adapters on `domains` in order; return the history and the metric matrices.

    model: a causal LM whose target modules already hold LoRA layers of
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
    "bwt" (of accuracy), "rank_sweep", "rank_curve" (each swept rank's share of the stage's gain, and the
    AURAC: ``rank_curve``) and "history" (step, epoch and rank rows).
    """
    domains = [_as_domain(d) for d in domains]
    if not domains:
        raise ValueError("run_continual: no domains given; expected at least one Domain")
    if config.replay_fraction > 0:
        domains = [Domain(*d) for d in with_replay(domains, config.replay_fraction, config.seed)]
    layers = lora_layers(model)
    if not layers:
        raise ValueError("run_continual: the model holds no LoRA layer; inject adapters first (load_model)")
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
        state.checkpointer = Checkpointer(checkpoint_dir, model, domains, config, device)
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
        state.rank_sweep.append({"stage": t, "domain": domains[t].name, "rank": rank, "by_rank": sweep})
        if (config.lambda_dc > 0 or config.lambda_l2 > 0) and t + 1 < len(domains):
            state.snapshot = snapshot_adapters(layers)
        if config.lambda_ewc > 0 and t + 1 < len(domains):
            state.ewc = fisher_anchor(model, layers, domains[t].train, config.ewc_batches, config.batch_size, device,
                                      previous=state.ewc,
                                      autocast=autocast_context(device, resolved_dtype(config, device)))
        state.stage, state.epoch, state.batch, state.own_eval = t + 1, 0, 0, None
        if state.checkpointer is not None:
            state.checkpointer.save(state, None)

    result = {
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
    result["rank_curve"] = rank_curves(result)
    return result
