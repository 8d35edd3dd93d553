"""Data-parallel training: one process per device, started by ``torchrun``, gradients averaged by DDP.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; ``setup`` joins that process
group (NCCL on CUDA, gloo on the CPU) and ``current`` describes it to the
trainer. Without torchrun, ``current`` is a group of one and every method below
is the single-process code path itself.

What makes W processes train like one process on the same global batch:

- The global micro-batch of ``batch_size`` examples (rows of the epoch order,
  a function of (seed, stage, epoch) only) is cut into W contiguous shards,
  sizes differing by at most one; process k takes rows [k B / W, (k+1) B / W).
  A process whose shard is empty (a short last batch) runs one example with
  every label ignored, so it joins the gradient all-reduce and its random
  streams advance as everyone's do, and adds nothing.
- The loss of a micro-batch is the mean cross-entropy over the n labelled
  targets of the *global* micro-batch: process k holds the sum S_k over its
  n_k targets, n = sum_k n_k is all-reduced before the forward, and k
  backpropagates W S_k / n. DDP averages the gradients over the W processes,
  which gives the gradient of sum_k S_k / n: the single process's, up to the
  order of floating-point sums. Token counts differ per shard, so scaling each
  shard by its own count would not.
- Every process draws the same DyLoRA rank, the same dropout seeds and the same
  rank cuts, since they come from generators seeded alike and advanced alike.
- LoRA dropout drops what one process drops: the fused op keys its mask on
  (seed, row of the global micro-batch). The examples of a micro-batch share
  one length T (they stack into one tensor; ``data`` pads a whole domain to
  one), so a layer's input, flattened to [rows, in],
  holds example i in rows [i T, (i+1) T), and process k, holding examples
  [s, e) of the micro-batch, passes s T as its row offset
  (``LoRALayer.set_dropout_row_offset``; ``shard_start`` gives s).
- Evaluation is sharded the same way; the token-weighted sums (loss, correct
  predictions, targets) are all-reduced before the means are taken.

What cannot match a single process bit for bit: the base model's own dropout
(GPT-2's on embeddings, attention and residuals). Torch's dropout draws a mask
for the shape it is given, so a process's rows get other masks than one
process gives them: with that dropout on the runs agree in distribution, not
in value.
"""

import inspect
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from hybrid_lora.train.metrics import IGNORE_INDEX, causal_lm_loss, shifted_targets


class DistributedError(ValueError):
    """A data-parallel setting that cannot work (an explicit device index under torchrun, an indivisible batch)."""


def launched_by_torchrun():
    """True when torchrun (or an equal launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_text="auto"):
    """Join torchrun's process group if this process is one of several; return the device this process uses.

    device_text: auto, cpu or cuda. Under torchrun, "cuda" (or auto on a machine
    with CUDA) is the process's own GPU, LOCAL_RANK, with NCCL; "cpu" uses gloo.
    A single process returns the device as ``models.pick_device`` gives it.
    """
    from hybrid_lora.io.models import pick_device

    device = pick_device(None if device_text in (None, "", "auto") else device_text)
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise DistributedError(f"device {str(device)!r}: under torchrun each process takes the GPU of its "
                                   "LOCAL_RANK; expected cuda or auto")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} GPUs; "
                                   "expected --nproc_per_node at most that")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return device


def teardown():
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def current():
    """The DataParallel of this process: the initialised torch.distributed group, or a group of one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DataParallel(dist.get_world_size(), dist.get_rank())
    return DataParallel(1, 0)


class _IgnoredLabels(Dataset):
    """The training set, where index -1 - i is example i with every label ignored (a shard's stand-in row)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index >= 0:
            return self.dataset[index]
        example = self.dataset[-1 - index]
        return {**example, "labels": torch.full_like(torch.as_tensor(example["labels"]), IGNORE_INDEX)}


class DataParallel:
    """One process's view of the data-parallel group: its shards, its loss scaling, its reductions."""

    def __init__(self, world, rank):
        self.world, self.rank = int(world), int(rank)

    @property
    def is_main(self):
        """The process that writes files and prints: rank 0."""
        return self.rank == 0

    def shard(self, n):
        """Rows [start, end) of n rows that this process takes."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def shard_start(self, micro_batch, batch_size, size):
        """Where this process's shard of global micro-batch `micro_batch` of an epoch of `size` rows starts in it."""
        return self.shard(min(batch_size, size - micro_batch * batch_size))[0]

    def check_batch_size(self, batch_size, what="batch_size"):
        if batch_size % self.world:
            raise DistributedError(f"{what} {batch_size}: the global batch is split over {self.world} processes; "
                                   f"expected a multiple of {self.world}")

    def epoch_loader(self, dataset, order, start_batch, batch_size, pin_memory):
        """The micro-batches of one epoch from global micro-batch `start_batch` on: this process's shard of each."""
        if self.world == 1:
            # A list of indices is a sampler: the epoch's order, less the micro-batches a resumed run already did.
            return DataLoader(dataset, batch_size=batch_size, sampler=order[start_batch * batch_size:].tolist(),
                              generator=torch.Generator(),  # keeps the loader off torch's global generator
                              pin_memory=pin_memory)  # lets move_batch copy without blocking
        order = order.tolist()
        shards = []
        for begin in range(start_batch * batch_size, len(order), batch_size):
            rows = order[begin:begin + batch_size]
            start, end = self.shard(len(rows))
            shards.append(rows[start:end] or [-1 - rows[0]])
        return DataLoader(_IgnoredLabels(dataset), batch_sampler=shards, generator=torch.Generator(),
                          pin_memory=pin_memory)

    def micro_batch_loss(self, logits, batch):
        """(loss, tokens): the micro-batch's mean CE as this process contributes it, and its attended tokens.

        Summed over the processes, the losses give the global micro-batch's mean
        CE over its labelled targets, and the tokens its attended tokens.
        """
        if self.world == 1:
            return causal_lm_loss(logits, batch["labels"]), batch["attention_mask"].sum()
        logits, targets = shifted_targets(logits, batch["labels"])
        labelled = targets != IGNORE_INDEX
        count = labelled.sum()
        dist.all_reduce(count)
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum") / count
        # A stand-in row (every label ignored) attends to tokens that are no data.
        tokens = batch["attention_mask"].sum() * (batch["labels"] != IGNORE_INDEX).any()
        return loss, tokens

    def backward(self, loss):
        """Backpropagate this process's share so that DDP's average over W processes is the global gradient."""
        (loss * self.world if self.world > 1 else loss).backward()

    def wrap(self, model, device):
        """`model` in DistributedDataParallel (the model itself for one process).

        Wrap again after a rank cut: the cut makes new adapter Parameters, and
        DDP lays its buckets out over the ones it is given, once, at construction.
        `model` may be compiled (``compiled.compiled_model``): DDP's forward then
        runs eager around the compiled graph.
        """
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Every parameter with requires_grad gets a gradient at every step, zeros
        # included (DyLoRA's frozen components are zeroed after backward, the
        # components past the sampled rank get zeros from the slice), so DDP needs
        # no search for unused parameters. Every process builds the same model
        # from the same seed (and checkpoint), so the frozen base, hundreds of MB,
        # is not broadcast; GPT-2's buffers are constants.
        device_ids = [torch.cuda.current_device() if device.index is None else device.index] \
            if device.type == "cuda" else None
        # torch 2.13 names the per-forward buffer sync forward_sync_buffers; torch 2.11 broadcast_buffers.
        known = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=device_ids, init_sync=False, find_unused_parameters=False,
                                       **no_buffer_sync)

    def sync_gradients(self, model, sync):
        """A context for one micro-batch's forward and backward: no gradient all-reduce unless `sync`."""
        if self.world == 1 or sync or not hasattr(model, "no_sync"):
            return nullcontext()
        return model.no_sync()

    def sum(self, tensor):
        """The sum of `tensor` over the processes (`tensor` itself for one process)."""
        if self.world == 1:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    def eval_shard(self, dataset):
        """This process's contiguous share of an evaluation set."""
        if self.world == 1:
            return dataset
        return Subset(dataset, range(*self.shard(len(dataset))))

    def from_main(self, compute):
        """compute() on rank 0, its result (or its exception) given to every process.

        For what only rank 0 may decide: whether a file exists, what a
        checkpoint holds (the other processes may not share rank 0's disk).
        """
        if self.world == 1:
            return compute()
        message = [None]
        if self.is_main:
            try:
                message[0] = (True, compute())
            except Exception as err:  # raised on every process, after they all have it
                message[0] = (False, err)
        dist.broadcast_object_list(message, src=0)
        ok, value = message[0]
        if not ok:
            raise value
        return value

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def describe(self):
        return f"process {self.rank} of {self.world}"
