"""Non-finite losses and gradients: found on the device, the update skipped there, reported at a host read.

The scheme of ``torch.amp.GradScaler`` without the scale. Each optimizer step
checks the step's loss and every gradient for NaN and infinity into a flag on
the device (``torch._amp_foreach_non_finite_check_and_unscale_`` with a scale
of 1, the check GradScaler makes), and the optimizer skips the update there:
fused AdamW reads the flag as ``found_inf`` and leaves parameters, moments and
step count as they were; any other optimizer steps and then has its parameters
and state put back where the flag is set. No step reads the host. The loop
calls ``poll`` where it reads the host anyway (a logging interval, a
checkpoint, an epoch end), before anything is recorded or written.

policy "stop" (the default): the first non-finite step sets a sticky flag; it
and every later step are skipped, so the model keeps the parameters of the
last good step, and ``poll`` raises NonFiniteError naming stage, epoch and step.
policy "skip": each non-finite step alone is skipped and left out of the loss
totals (``kept``); ``poll`` returns how many were skipped.

Finite steps can still carry the adapters so far that the model's outputs
overflow; ``check_evaluation`` stops the run, under either policy, when an
epoch's evaluation loss is not finite, before its adapters are saved.
"""

import math

import torch

from hybrid_lora.errors import UserError

POLICIES = ("stop", "skip")


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss or gradient (under the "stop" policy)."""


def fused_adamw_supported(device):
    """Whether torch has a fused AdamW for `device`, the one that skips a step on the device flag."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the list: the guard's other path serves any optimizer
        return False
    return device.type in _get_fused_kernels_supported_devices()


class NonFiniteGuard:
    """The found-inf flags of one stage's optimizer; see the module docstring. `global_step`: steps done so far."""

    def __init__(self, optimizer, device, policy="stop", global_step=0, reduce=None):
        """reduce: sums a tensor over the processes of a data-parallel group (a device collective), so that
        every process skips the same steps; None for one process."""
        if policy not in POLICIES:
            raise ValueError(f"non-finite policy {policy!r}; expected one of {POLICIES}")
        self.optimizer, self.policy, self.reduce = optimizer, policy, reduce
        self._one = torch.ones((), dtype=torch.float32, device=device)
        self.found = torch.zeros((), dtype=torch.float32, device=device)  # this step: 1.0 if non-finite
        self.skip = torch.zeros((), dtype=torch.float32, device=device)  # this step's update skipped
        self.halted = torch.zeros((), dtype=torch.float32, device=device)  # sticky under "stop"
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # non-finite steps so far
        self.steps = torch.full((), global_step, dtype=torch.int64, device=device)  # global step, on the device
        self.first = torch.full((), -1, dtype=torch.int64, device=device)  # global step of the first one
        self.first_in_loss = torch.zeros((), dtype=torch.bool, device=device)  # was its loss non-finite?

    def step(self, loss):
        """optimizer.step(), skipped on the device if `loss` (a scalar tensor) or a gradient is not finite."""
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.found.zero_()
        if grads:
            # Sets found to 1 on any NaN/inf; multiplies each gradient by 1, which changes no value.
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found, self._one)
        loss_bad = ~torch.isfinite(loss.detach()).reshape(())
        if self.reduce is not None:  # one process's local loss, the others' flags
            loss_bad = self.reduce(loss_bad.float()) > 0
            self.found.copy_((self.reduce(self.found) > 0).float())
        self.found.copy_(torch.maximum(self.found, loss_bad.float()))
        self.steps += 1
        first_time = (self.count == 0) & (self.found > 0)
        self.first.copy_(torch.where(first_time, self.steps, self.first))
        self.first_in_loss.copy_(torch.where(first_time, loss_bad, self.first_in_loss))
        self.count += self.found.long()
        if self.policy == "stop":
            self.halted.copy_(torch.maximum(self.halted, self.found))
            self.skip.copy_(self.halted)
        else:
            self.skip.copy_(self.found)
        if all(group.get("fused") for group in self.optimizer.param_groups):
            self.optimizer.grad_scale, self.optimizer.found_inf = None, self.skip
            try:
                self.optimizer.step()
            finally:
                self.optimizer.found_inf = None
        else:
            self._step_and_put_back()
        return self.skip

    def kept(self, value):
        """`value` for a step whose update was applied, 0 for a skipped one (keeps totals finite)."""
        return torch.where(self.skip > 0, torch.zeros_like(value), value)

    def _step_and_put_back(self):
        """Step any optimizer, then restore its parameters and tensor state where the step is skipped."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        before = {p: (p.detach().clone(), {k: v.clone() for k, v in self.optimizer.state.get(p, {}).items()
                                           if isinstance(v, torch.Tensor)}) for p in params}
        self.optimizer.step()
        skip = self.skip > 0
        with torch.no_grad():
            for p, (value, state) in before.items():
                p.copy_(torch.where(skip, value, p))
                for key, now in self.optimizer.state.get(p, {}).items():
                    # State made by this very step goes back to zeros, as a fresh optimizer has it.
                    if isinstance(now, torch.Tensor) and now.device == skip.device:
                        old = state.get(key, torch.zeros_like(now))
                        now.copy_(torch.where(skip, old, now))

    def poll(self, stage, domain, epoch, epoch_start_step, lr):
        """Read the flags (one host read). Under "stop", raise NonFiniteError if a step was non-finite.

        Returns the number of non-finite steps so far (all skipped). epoch_start_step:
        the global step count when the epoch began, to name the step within it.
        """
        count, first, in_loss = (int(v) for v in torch.stack([self.count, self.first,
                                                              self.first_in_loss.long()]).tolist())
        if count and self.policy == "stop":
            what = "the loss" if in_loss else "a gradient"
            raise NonFiniteError(
                f"training diverged at stage {stage + 1} ({domain}), epoch {epoch + 1}, step "
                f"{first - epoch_start_step} (global step {first}): {what} is NaN or infinite; no update was made "
                f"from that step on and nothing non-finite was written; try a lower --lr (now {lr:g}), or "
                "--on-nonfinite skip to skip such steps")
        return count


def check_evaluation(loss, stage, domain, epoch, lr):
    """Raise NonFiniteError if the evaluation loss after an epoch is NaN or infinite (the adapters diverged)."""
    if not math.isfinite(loss):
        raise NonFiniteError(
            f"training diverged at stage {stage + 1} ({domain}), epoch {epoch + 1}: the evaluation loss after the "
            f"epoch is {loss}; its adapters were not saved; try a lower --lr (now {lr:g})")


def check_applied(applied, steps, stage, domain, epoch, lr):
    """Raise NonFiniteError if no step of an epoch was applied (under "skip", every one was non-finite)."""
    if applied == 0:
        raise NonFiniteError(f"every one of the {steps} steps of stage {stage + 1} ({domain}), epoch {epoch + 1} "
                             f"had a NaN or infinite loss or gradient and was skipped; try a lower --lr (now {lr:g})")
