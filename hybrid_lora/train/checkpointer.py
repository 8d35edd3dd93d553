"""The trainer's checkpointer: one file that puts a run back where it was (``checkpoint`` writes and reads it)."""

import dataclasses
import hashlib
import json

import torch

from hybrid_lora.io.adapter_files import named_adapters
from hybrid_lora.train import distributed
from hybrid_lora.train.checkpoint import (CheckpointError, checkpoint_path, load_checkpoint,
                                          optimizer_to_checkpoint, require_equal, rng_from_checkpoint,
                                          rng_to_checkpoint, save_checkpoint, snapshot_from_checkpoint,
                                          snapshot_to_checkpoint)
from hybrid_lora.train.ewc import anchor_from_checkpoint, anchor_to_checkpoint
from hybrid_lora.train.state import EpochTotals


class Checkpointer:
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
            state.epoch_totals = EpochTotals(**totals, **progress["totals"])
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
