"""Training compiled: the model's forward and backward under ``torch.compile``, one graph for every sampled rank.

``loss_function(config, parallel)`` gives the function a training step
calls for the loss of a micro-batch, and ``compiled_model`` the module DDP
wraps under torchrun. With ``config.compile``, one process compiles the loss
function (the model's forward and the loss); under torchrun the model is
compiled inside DDP. Both compile with ``fullgraph=True``, on every
supported torch (2.11 and newer). What the compiled path relies on:

- No per-step value is a Python number in the graph. A LoRA layer keeps
  its active rank and its scale in 0-d buffers written in place, and the
  fused op reads them on the device, so DyLoRA's rank drawn every step (on
  the host, from its own CPU generator: nothing is read back from the
  device) changes values, not the graph; each call's dropout seed is a
  random op of the graph, drawn on the device. The frozen mode's gradient masking runs after backward on
  the gradients, by host-side rank, with no host read either.
- Static shapes (``dynamic=False``): a rank cut changes the adapters' shapes
  and compiles once per adapter width; a smaller last batch of an epoch
  compiles once more; a stage's domain has one sequence length (the data
  pads each domain to one length), so a new stage may compile once more.
  Nothing else recompiles: ``graph_bound`` counts these graphs, and Dynamo's
  recompile limit (8 by default) is raised to it. Past the limit, with
  ``fullgraph=True``, Dynamo raises ``FailOnRecompileLimitHit``: a run never
  falls back to eager silently. A cut makes new adapter
  Parameters (``LoRALayer.truncate_``): a module dict that changes is what
  makes every torch from 2.11 on check the tensors again, where shrinking
  ``.data`` in place let torch 2.11 replay the old width's graph.
- The optimizer stays outside the graph: Dynamo does not trace the fused
  AdamW step, which already is one kernel per parameter group; the trainer
  runs it fused wherever torch has a fused AdamW for the device (CUDA, and
  the CPU in recent torch), so that it also skips non-finite steps on the
  device (``nonfinite``).
- GPT-2's own dropout and the LoRA dropout seeds, under Inductor, draw from
  Inductor's generator, not eager PyTorch's: with either on, a compiled run
  is a different (equally random) run from an eager one; with both off, they
  agree to rounding.
"""

import torch

from hybrid_lora.train.metrics import model_logits

COMPILE_BACKEND = "inductor"  # what torch.compile lowers to; "aot_eager" skips code generation (tests)
COMPILE_MODE = None  # "reduce-overhead" adds CUDA graphs on a GPU


def loss_function(config, parallel, stages=1, backend=None, mode=None):
    """(model, batch) -> (CE, tokens) of one micro-batch, as ``parallel.micro_batch_loss`` gives them.

    With config.compile in one process, the whole function runs under
    torch.compile (the model's forward, the loss, and through autograd their
    backward). Under torchrun the model is compiled instead, inside DDP
    (``compiled_model``), and this function stays eager: its loss all-reduces
    the token count, and its model is DDP, whose own forward Dynamo does not
    trace with ``fullgraph=True`` (it calls DDP's logger and reducer).
    stages: the stages trained so far in this process, this one included
    (``graph_bound``).
    """

    def loss(model, batch):
        return parallel.micro_batch_loss(model_logits(model, batch), batch)

    if not config.compile or parallel.world > 1:
        return loss
    return _compile(loss, graph_bound(config, stages), backend, mode)


def compiled_model(model, config, parallel, stages=1, backend=None, mode=None):
    """The module DDP wraps under torchrun: `model`, or with config.compile `model` under torch.compile.

    DDP over the compiled model rather than torch.compile over DDP: DDP's
    forward (its reducer's bookkeeping) then runs eager, and the model it
    calls compiles to one graph (``fullgraph=True`` holds). Dynamo compiles
    that graph while DDP's forward is active, so its DDPOptimizer still splits
    it at DDP's bucket boundaries and gradients are all-reduced while the
    backward runs. Build DDP again after a rank cut (``DataParallel.wrap``);
    the compiled model is kept and recompiles once for the new width. One
    process returns `model` itself (``loss_function`` compiles the step).
    """
    if not config.compile or parallel.world == 1:
        return model
    return _compile(model, graph_bound(config, stages), backend, mode)


def graph_bound(config, stages):
    """The most graphs a compiled run of `stages` stages makes: per stage, one per adapter width (the rank
    schedule cuts at most once per entry) for its sequence length, times two for a smaller last batch."""
    return stages * (1 + len(config.rank_schedule)) * 2


def _compile(fn, bound, backend, mode):
    # Global, as Dynamo's settings are: the process trains.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, bound)
    return torch.compile(fn, backend=backend or COMPILE_BACKEND, mode=mode or COMPILE_MODE, fullgraph=True,
                         dynamic=False)
