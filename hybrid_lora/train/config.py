"""A training run's settings (``TrainConfig``), the named variants of the method and its baselines, and the
model and autocast a configuration builds."""

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from hybrid_lora.io.models import load_causal_lm, pick_device
from hybrid_lora.nn.layer import check_rank, inject_lora
from hybrid_lora.nn.scaling import SCALE_RULES
from hybrid_lora.train.dynamic_rank import DYLORA_MODES, check_rank_schedule
from hybrid_lora.train.nonfinite import POLICIES
from hybrid_lora.train.presets import base_lr, preset_fields
from hybrid_lora.train.regularizers import DC_MODES

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
    dylora: str = "nested"  # rank per step: "off", "frozen" (official DyLoRA), "full" (uniform 1..r), "nested"
    #                         (r, r/2, r/4), "log-uniform" (1..r), "multi-rank" (1, 2, 4, ..., r), "doubling"
    #                         (one of 1, 2, 4, ..., r): see dynamic_rank
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
    # QLoRA. None (not False, not ""): a run recorded before these fields existed has the same settings.
    load_in_4bit: str = None  # "nf4" or "fp4": the base's linear layers in 4 bits (bitsandbytes); None: 16/32 bits
    bnb_4bit_double_quant: bool = None  # with load_in_4bit, True or False: the block scales quantized to 8 bits too

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
        if self.load_in_4bit not in (None, "nf4", "fp4"):
            raise ValueError(f"TrainConfig.load_in_4bit={self.load_in_4bit!r}; expected None, 'nf4' or 'fp4'")
        if self.bnb_4bit_double_quant not in ((None,) if self.load_in_4bit is None else (True, False)):
            raise ValueError(f"TrainConfig.bnb_4bit_double_quant={self.bnb_4bit_double_quant!r}; expected "
                             f"{'None without load_in_4bit' if self.load_in_4bit is None else 'True or False'}")
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
    model = load_causal_lm(config.model_name, quantization=_quantization(config, device), device=device)
    torch.manual_seed(config.seed)
    layers = inject_lora(model, _target_modules(config.target_modules), r_max=config.r_max, alpha=config.alpha,
                         dropout=config.lora_dropout, scale_rule=config.scale_rule)
    if device.type == "cuda" and resolved_dtype(config, device) == "bfloat16" and config.load_in_4bit is None:
        for layer in layers:
            layer.weight.data = layer.weight.data.to(torch.bfloat16)
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(torch.bfloat16)
    return model.to(device)


def _quantization(config, device):
    """The 4-bit loading of config.load_in_4bit (QLoRA), decoded to the autocast dtype; None for a 16/32-bit base."""
    if config.load_in_4bit is None:
        return None
    from hybrid_lora.io.quantization import Quantization

    compute = AUTOCAST_DTYPES[resolved_dtype(config, device)] or torch.float32
    return Quantization(config.load_in_4bit, config.bnb_4bit_double_quant, compute)


def _target_modules(targets):
    """One string is a regular expression over whole module names (as peft reads it); several are names."""
    return targets[0] if len(targets) == 1 and not re.fullmatch(r"[\w.]+", targets[0]) else list(targets)
