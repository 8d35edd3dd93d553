"""Training compiled: the model's forward and backward under ``torch.compile``, one graph for every sampled rank.

``loss_function(config, parallel)`` gives the function a training step
calls for the loss of a micro-batch: eager, or with ``config.compile`` the
same function compiled with ``fullgraph=True``. What the compiled path
relies on:

- No per-step value is a Python number in the graph. A LoRA layer keeps
  its active rank, its scale and its dropout seed in 0-d buffers written in
  place, and the fused op reads them on the device, so DyLoRA's rank drawn
  every step (on the host, from its own CPU generator: nothing is read back
  from the device) and the dropout seed advanced every call change values,
  not the graph. The frozen mode's gradient masking runs after backward on
  the gradients, by host-side rank, with no host read either.
- Static shapes (``dynamic=False``): a rank cut changes the adapters' shapes
  and compiles once per adapter width; a smaller last batch of an epoch
  compiles once more. Nothing else recompiles.
- The optimizer stays outside the graph: Dynamo does not trace the fused
  AdamW step, which already is one kernel per parameter group; the trainer
  runs it fused wherever torch has a fused AdamW for the device (CUDA, and
  the CPU in recent torch), so that it also skips non-finite steps on the
  device (``nonfinite``).
- GPT-2's own dropout, under Inductor, draws from Inductor's generator, not
  eager PyTorch's: with it on, a compiled run is a different (equally
  random) run from an eager one; with it off, they agree to rounding.
"""

import torch

from .errors import BadValue
from .metrics import model_logits
from .versions import release

# The oldest torch whose Dynamo compiles the fused op in one graph and follows a
# rank cut: on torch 2.11 Dynamo refuses to trace into the op's Triton path
# ("function marked as skipped") and keeps a graph compiled for the adapter's
# old width after a cut.
COMPILE_MIN_TORCH = (2, 13)

COMPILE_BACKEND = "inductor"  # what torch.compile lowers to; "aot_eager" skips code generation (tests)
COMPILE_MODE = None  # "reduce-overhead" adds CUDA graphs on a GPU


def loss_function(config, parallel, backend=None, mode=None):
    """(model, batch) -> (CE, tokens) of one micro-batch, as ``parallel.micro_batch_loss`` gives them.

    With config.compile the function runs under torch.compile (the model's
    forward, the loss, and through autograd their backward), in one process
    only. Data-parallel training compiled is refused: Dynamo cannot trace
    DDP's forward with ``fullgraph=True`` (its reducer), and a compiled inner
    module does not survive a rank cut, whose in-place shrinking of the
    adapter parameters leaves autograd expecting their old shapes.
    """

    def loss(model, batch):
        return parallel.micro_batch_loss(model_logits(model, batch), batch)

    if not config.compile:
        return loss
    if parallel.world > 1:
        raise BadValue(f"compile=True with {parallel.world} processes: training compiled runs in one process; "
                       "under torchrun train without --compile")
    if not compile_supported():
        raise BadValue(f"compile=True with torch {torch.__version__}: training compiled needs torch >= "
                       f"{'.'.join(map(str, COMPILE_MIN_TORCH))}; train without --compile or upgrade torch")
    return torch.compile(loss, backend=backend or COMPILE_BACKEND, mode=mode or COMPILE_MODE,
                         fullgraph=True, dynamic=False)


def compile_supported() -> bool:
    """Whether this torch compiles the training step (``COMPILE_MIN_TORCH``)."""
    return release(torch.__version__)[:2] >= COMPILE_MIN_TORCH
