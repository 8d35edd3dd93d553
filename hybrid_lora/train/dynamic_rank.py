"""Changing the rank while training: DyLoRA's sampled rank per step, and a rank schedule per epoch.

DyLoRA (Valipour et al., EACL 2023, and its official code): each step draws
b ~ Uniform{1..r} and trains the truncated adapter A[:, :b], B[:b, :] with
scale alpha / b. In 'frozen' mode (what the official code runs) components
0..b-2 are detached, so only component b-1 learns from that step; in 'full'
mode all b components do. One b is drawn per step and shared by all layers.

'nested' mode (in the spirit of Matryoshka representations and of
MatryoshkaLoRA, arXiv 2605.07850, which finds uniform sampling of 1..r
data-inefficient at high ranks) draws b from the ranks that get deployed,
{r, r/2, r/4}, and trains all b components: the leading r/4 learn at every
step and every rank of that set is trained as itself. It runs through the
layers' runtime rank, with no copy of the adapter; with the ``fixed`` scale
rule (``scaling``) the rank-b adapter is exactly the leading part of the
rank-r one.

Two more samplers train every prefix 1..r (the nested one leaves the ranks
below r/4 untrained):

- 'log-uniform' draws b = floor(exp(u)) with u ~ Uniform[0, ln(r + 1)), so
  P(b) = ln((b + 1) / b) / ln(r + 1): each octave [2^k, 2^(k+1)) of ranks
  gets the same share of the steps (exactly when r + 1 is a power of two),
  where 'full' gives the top octave half of them. All b components train, as in 'full'.
- 'multi-rank' draws nothing: every step trains at each rank of
  ``doubling_ranks(r)`` = {1, 2, 4, ..., r} and its loss is the mean of the
  CE losses at those ranks, as Matryoshka representations (Kusupati et al.,
  NeurIPS 2022, "Matryoshka Representation Learning") sum the loss over nested
  sizes at every step. The mean is the sum scaled by 1 / len(ranks): AdamW's
  update does not depend on the loss's scale (but for its eps), and the
  regularisers keep the weight they have in the one-rank modes. A step costs len(ranks) forward and backward passes
  (7 at r = 64).
- 'doubling' is multi-rank at the compute of one pass: each step draws one
  rank of ``doubling_ranks(r)`` and trains all b components, so over the steps
  every served rank is trained as itself, as Matryoshka's summed loss trains
  each nested size. r is drawn at one step in three, as often as 'nested'
  draws it (a top rank drawn rarely learns its domain less: log-uniform draws
  64 at 2 % of the steps); the other ranks share the rest equally, 1 / 9
  each at r = 64.

'full' is the uniform sampler: b ~ Uniform{1..r}, DyLoRA's own draw, with
every component up to b trained.

A rank schedule cuts the adapter at the start of an epoch: ``truncate_adapters``
keeps the leading components and the optimizer state that belongs to them, so
AdamW's moments survive the cut (an option resets them, for comparison).
"""

import math
from contextlib import contextmanager

import torch

from hybrid_lora.nn.layer import check_rank

DYLORA_MODES = ("off", "frozen", "full", "nested", "log-uniform", "multi-rank", "doubling")
NESTED_DIVISORS = (1, 2, 4)  # nested mode trains the ranks r // d


def check_rank_schedule(schedule, r_max, epochs):
    """Raise unless `schedule` is a non-increasing sequence of ranks in [1, r_max], no longer than `epochs`."""
    schedule = tuple(schedule)
    if len(schedule) > epochs:
        raise ValueError(f"rank schedule {schedule} has {len(schedule)} entries; expected at most {epochs} "
                         "(one per epoch)")
    for rank in schedule:
        check_rank(rank, r_max, f"rank schedule {schedule}")
    if any(later > earlier for earlier, later in zip(schedule, schedule[1:])):
        raise ValueError(f"rank schedule {schedule}: expected non-increasing ranks (a cut adapter cannot grow)")
    return schedule


def scheduled_rank(schedule, epoch):
    """The rank for 0-based `epoch`: schedule[epoch], the last entry after the schedule ends, None if empty."""
    if not schedule:
        return None
    return schedule[min(epoch, len(schedule) - 1)]


class RankSampler:
    """Draws DyLoRA's b ~ Uniform{1..r} from its own seeded generator (on the CPU: no device sync)."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(int(seed))

    def sample(self, rank):
        if rank < 1:
            raise ValueError(f"RankSampler.sample: rank {rank}; expected >= 1")
        return int(torch.randint(1, rank + 1, (1,), generator=self.generator))

    def sample_nested(self, rank):
        """One of ``nested_ranks(rank)``, uniformly."""
        ranks = nested_ranks(rank)
        return ranks[int(torch.randint(0, len(ranks), (1,), generator=self.generator))]

    def sample_log_uniform(self, rank):
        """b in 1..rank with P(b) = ln((b + 1) / b) / ln(rank + 1): floor(exp(u)), u ~ Uniform[0, ln(rank + 1))."""
        if rank < 1:
            raise ValueError(f"RankSampler.sample_log_uniform: rank {rank}; expected >= 1")
        u = float(torch.rand((1,), generator=self.generator, dtype=torch.float64))
        # min/max: exp of a float64 product may round past the ends of 1..rank
        return min(rank, max(1, math.floor(math.exp(u * math.log(rank + 1)))))

    def sample_doubling(self, rank):
        """One of ``doubling_ranks(rank)``: `rank` with probability 1/3, each lower one with 2 / (3 (n - 1))."""
        ranks = doubling_ranks(rank)
        lower = len(ranks) - 1
        if lower == 0:
            return rank
        # 3 * lower equally likely slots: the first `lower` are the top rank, the other 2 * lower two per rank
        slot = int(torch.randint(0, 3 * lower, (1,), generator=self.generator))
        return rank if slot < lower else ranks[(slot - lower) // 2]


def nested_ranks(rank):
    """The ranks nested mode trains at current rank r: r // d for d in NESTED_DIVISORS, at least 1, distinct,
    ascending ((16, 32, 64) for r = 64; (1, 2) for r = 2)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"nested_ranks: rank {rank!r}; expected an integer >= 1")
    return tuple(sorted({max(1, rank // d) for d in NESTED_DIVISORS}))


def doubling_ranks(rank):
    """1, 2, 4, ... up to `rank`, and `rank` itself: (1, 2, 4, 8, 16, 32, 64) for 64; (1, 2, 4, 6) for 6."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"doubling_ranks: rank {rank!r}; expected an integer >= 1")
    return tuple(sorted({1 << k for k in range(rank.bit_length())} | {rank}))


def step_rank(mode, sampler, rank):
    """The rank one training step runs at, for a one-rank DyLoRA `mode` at current rank `rank`."""
    if mode == "off":
        return rank
    if mode == "nested":
        return sampler.sample_nested(rank)
    if mode == "log-uniform":
        return sampler.sample_log_uniform(rank)
    if mode == "doubling":
        return sampler.sample_doubling(rank)
    if mode == "multi-rank":
        raise ValueError("step_rank: 'multi-rank' trains several ranks per step; expected step_ranks for it")
    return sampler.sample(rank)


def step_ranks(mode, sampler, rank):
    """The ranks one training step runs at, whose CE losses it averages: ``doubling_ranks(rank)`` for
    'multi-rank', else the one rank ``step_rank`` draws."""
    if mode == "multi-rank":
        return doubling_ranks(rank)
    return (step_rank(mode, sampler, rank),)


@contextmanager
def active_rank(layers, rank):
    """Run the layers at `rank` inside the block and give them back their ranks after it, even on error."""
    previous = [layer.rank for layer in layers]
    try:
        for layer in layers:
            layer.set_rank(rank)
        yield
    finally:
        for layer, r in zip(layers, previous):
            layer.set_rank(r)


@torch.no_grad()
def freeze_leading_grads(layers, sampled_rank):
    """DyLoRA 'frozen' mode after backward: zero the gradient of components 0..b-2 of every layer.

    Equal to detaching those components in the forward, since a gradient is all
    they would have received; components past b-1 got none from the step anyway.
    """
    frozen = sampled_rank - 1
    if frozen <= 0:
        return
    for layer in layers:
        if layer.lora_a.grad is not None:
            layer.lora_a.grad[:, :frozen].zero_()
        if layer.lora_b.grad is not None:
            layer.lora_b.grad[:frozen].zero_()


def truncate_adapters(layers, rank, optimizer=None, reset_state=False):
    """Cut every layer to its leading `rank` components (r_max becomes `rank`), carrying the optimizer along.

    Each layer's adapters become new Parameters (``LoRALayer.truncate_``); the
    optimizer's param groups take the new ones in the old ones' places, with
    the old ones' state. Its per-parameter tensors shaped like a parameter
    (AdamW's exp_avg, exp_avg_sq, max_exp_avg_sq) are cut the same way; scalars
    such as the step count stay. ``reset_state`` drops the state of the cut
    parameters instead. Anything else holding the old Parameters (a DDP
    wrapper, a compiled graph) must be rebuilt or recompiles. Returns the number
    of adapter parameters left.
    """
    for layer in layers:  # all checked before any is cut
        check_rank(rank, layer.r_max, "truncate_adapters")
    replaced = {}
    for layer in layers:
        replaced.update(layer.truncate_(rank))
    if optimizer is not None:
        _replace_in_optimizer(optimizer, replaced, reset_state)
    return sum(layer.lora_a.numel() + layer.lora_b.numel() for layer in layers)


def _replace_in_optimizer(optimizer, replaced, reset_state):
    """Put each new Parameter of `replaced` ({old: new}) where the old one was, its state cut to the new shape."""
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(param, param) for param in group["params"]]
    for old, new in replaced.items():
        state = optimizer.state.pop(old, None)
        if state is None or reset_state:
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == old.shape:
                # The leading block, as truncate_ keeps it (A's leading columns, B's leading rows).
                leading = tuple(slice(0, size) for size in new.shape)
                state[key] = value[leading].clone(memory_format=torch.contiguous_format)
        optimizer.state[new] = state
