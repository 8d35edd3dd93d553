"""One continual run, end to end: data, base model, training, and its output folder.

A run is one (variant, seed) over a sequence of domains. Its folder holds

    config.json    what was run: the settings, the data, the versions (written first)
    metrics.json   the trainer's results (history per epoch, accuracy/loss matrices
                   R[stage][domain], retention, BWT, forgetting, rank sweep) plus
                   trainable parameters per rank, wall time and tokens/s (written last)
    adapters/stage<k>-<domain>.safetensors   the adapters at the end of each stage
    plots/*.png    see ``plots``

Both JSON files are written atomically, so a folder with a metrics.json holds a
finished run. While a run trains, the trainer keeps a checkpoint in its folder;
``--resume`` skips finished runs and continues the others from their checkpoint.
"""

import dataclasses
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybrid_lora import __version__
from hybrid_lora.experiments.data import load_domain
from hybrid_lora.experiments.summary import curve_summary
from hybrid_lora.io.adapter_files import save_adapter
from hybrid_lora.io.atomic import read_json, write_json
from hybrid_lora.io.models import load_tokenizer, resolve_model
from hybrid_lora.nn.layer import lora_layers
from hybrid_lora.train import distributed
from hybrid_lora.train.checkpoint import checkpoint_path
from hybrid_lora.train.config import load_model, variant_config
from hybrid_lora.train.trainer import run_continual
from hybrid_lora.versions import source_revision

DEFAULT_DOMAINS = ("embedded-a", "embedded-b")


@dataclass
class DataSpec:
    """Which domains, and how much of each."""
    domains: tuple = DEFAULT_DOMAINS  # trained in this order
    train_examples: int = 3000  # per domain, the original's select(range(3000))
    eval_examples: int = 1000  # per domain, the original's select(range(1000))
    max_length: int = 128  # tokens per example, the original's
    max_steps: int = 0  # > 0 keeps the first max_steps * batch_size training examples: at most that many steps per epoch


@dataclass
class RunSpec:
    variant: str = "hybrid"
    seed: int = 42
    model: str = "embedded"  # "embedded", a hub id such as "gpt2", or a local checkpoint folder of a causal LM
    data: DataSpec = field(default_factory=DataSpec)
    overrides: dict = field(default_factory=dict)  # TrainConfig fields set explicitly (the rest: the variant's)
    preset: str = "default"  # see ``presets``: under the variant's settings and the overrides


def train_config(spec):
    """The TrainConfig of a run: the preset, the variant's settings, the explicit overrides, then model and seed.

    The model is kept by the name it was given (``embedded``, ``gpt2``, a folder), checked here and resolved
    when it is loaded, so that the files a run writes read the same on every machine.
    """
    resolve_model(spec.model)
    return variant_config(spec.variant, preset=spec.preset,
                          **{**spec.overrides, "model_name": spec.model, "seed": spec.seed})


def prepare_domains(data, tokenizer, batch_size):
    """[(name, train_examples, eval_examples)] for `data`, tokenized."""
    domains = []
    for name in data.domains:
        domain_name, train, evaluation = load_domain(name, tokenizer, data.train_examples, data.eval_examples,
                                                     data.max_length)
        if data.max_steps > 0:
            train = train[:data.max_steps * batch_size]
        domains.append((domain_name, train, evaluation))
    return domains


def params_per_rank(model, ranks):
    """{r: trainable adapter parameters at rank r} = sum over layers of r * (in + out)."""
    per_rank = sum(layer.in_features + layer.out_features for layer in lora_layers(model))
    return {int(r): int(r) * per_rank for r in sorted(set(ranks))}


def forgetting(accuracy):
    """R[i][i] - R[T-1][i] for each earlier domain i: accuracy lost by the end (> 0 is forgetting)."""
    return [accuracy[i][i] - accuracy[-1][i] for i in range(len(accuracy) - 1)]


def run_summary(metrics):
    """The headline numbers of one finished run, for tables across seeds and variants."""
    accuracy, loss = metrics["accuracy"], metrics["loss"]
    domains = metrics["domains"]
    row = {}
    for i, name in enumerate(domains):
        row[f"acc_{name}_own"] = accuracy[i][i]
        row[f"acc_{name}_final"] = accuracy[-1][i]
        row[f"loss_{name}_own"] = loss[i][i]
        row[f"loss_{name}_final"] = loss[-1][i]
    if len(domains) > 1:
        row["retention"] = metrics["retention"][0] if len(domains) == 2 else None
        row["bwt"] = metrics["bwt"]
        row["forgetting"] = sum(metrics["forgetting"]) / len(metrics["forgetting"])
        row["loss_change"] = sum(metrics["loss_change"]) / len(metrics["loss_change"])
    row.update(curve_summary(metrics))
    row["wall_seconds"] = metrics["wall_seconds"]
    return row


def is_finished(run_dir):
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return False
    try:
        return "accuracy" in read_json(path)
    except ValueError:
        return False


class _StageSaver:
    """The trainer's log callback: prints each row and saves the adapters when a stage's last epoch ends."""

    def __init__(self, model, run_dir, base_model, epochs, echo, write=True):
        self.model, self.run_dir, self.base_model = model, Path(run_dir), base_model
        self.epochs, self.echo, self.write = epochs, echo, write
        self.adapters = []

    def __call__(self, row):
        if self.echo is not None:
            self.echo(format_row(row))
        if self.write and row.get("kind") == "epoch" and row["epoch"] == self.epochs - 1:
            name = f"stage{row['stage'] + 1}-{row['domain']}.safetensors"
            save_adapter(self.model, self.run_dir / "adapters" / name, self.base_model,
                         extra={"stage": row["stage"], "domain": row["domain"]})
            self.adapters.append(f"adapters/{name}")


def format_row(row):
    if row.get("kind") == "step":
        return (f"  stage {row['stage'] + 1} ({row['domain']}) epoch {row['epoch'] + 1} step {row['step']:5d}  "
                f"rank {row['rank']:3d}  train loss {row['train_loss']:.4f}")
    extras = ""
    if row.get("domain_correlation") is not None:
        extras += f"  L_DC {row['domain_correlation']:.4f}"
    return (f"stage {row['stage'] + 1} ({row['domain']}) epoch {row['epoch'] + 1}  rank {row['rank']:3d}  "
            f"train loss {row['train_loss']:.4f}  eval loss {row['eval_loss']:.4f}  "
            f"eval acc {row['eval_accuracy']:.4f}{extras}  ({row['tokens_per_second']:.0f} tok/s)")


def say(line):
    """Print a progress line now, even when stdout is a file or a pipe."""
    print(line, flush=True)


def run(spec, run_dir, domains=None, tokenizer=None, echo=say, plot=True, resume=False):
    """Train one run into `run_dir` and return its metrics. `domains` (tokenized) may be shared between runs.

    The trainer checkpoints into `run_dir` while the run goes on; `resume` continues
    from that checkpoint (a fresh start if there is none), otherwise it is discarded.
    The checkpoint is deleted once metrics.json is written. Under torchrun every
    process trains and only rank 0 writes files and echoes.
    """
    run_dir = Path(run_dir)
    checkpoint = checkpoint_path(run_dir)
    main = distributed.current().is_main
    echo = echo if main else None
    if main and not resume and checkpoint.exists():
        checkpoint.unlink()
    config = train_config(spec)
    if tokenizer is None:
        tokenizer = load_tokenizer(spec.model)
    if domains is None:
        domains = prepare_domains(spec.data, tokenizer, config.batch_size)
    config_file = {
        "variant": spec.variant, "seed": spec.seed, "model": spec.model, "preset": spec.preset,
        "data": dataclasses.asdict(spec.data),
        "data_sizes": {name: {"train": len(train), "eval": len(ev)} for name, train, ev in domains},
        "train_config": dataclasses.asdict(config),
        "overrides": spec.overrides,
        "versions": {"hybrid_lora": __version__, "commit": source_revision(), "torch": torch.__version__,
                     "python": platform.python_version()},
        # the arguments only: the program's own path names this machine's installation
        "command": ["hybrid-lora", *sys.argv[1:]],
    }
    if distributed.current().world > 1:
        config_file["processes"] = distributed.current().world  # data-parallel: batch_size is the global batch
    if main:
        write_json(run_dir / "config.json", config_file)
    if echo is not None:
        echo(f"== {spec.variant}, seed {spec.seed}: {' -> '.join(name for name, _, _ in domains)} -> {run_dir}")
    model = load_model(config)
    saver = _StageSaver(model, run_dir, spec.model, config.epochs, echo, write=main)
    start = time.perf_counter()
    results = run_continual(model, domains, config, log=saver, checkpoint_dir=run_dir, resume=resume)
    wall = time.perf_counter() - start
    epochs = [row for row in results["history"] if row["kind"] == "epoch"]
    tokens = sum(row["tokens"] for row in epochs)
    train_seconds = sum(row["seconds"] for row in epochs)
    ranks = [config.r_max, *config.rank_schedule, *(config.sweep_ranks or ()),
             *(1 << k for k in range(config.r_max.bit_length()))]
    metrics = {
        **results,
        "variant": spec.variant,
        "seed": spec.seed,
        "model": spec.model,
        "forgetting": forgetting(results["accuracy"]),
        "params_per_rank": params_per_rank(model, [r for r in ranks if r <= config.r_max]),
        "wall_seconds": wall,
        "train_tokens": tokens,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens / train_seconds if train_seconds > 0 else None,
        # Every stage's file, also those a resumed run saved before it was interrupted.
        "adapters": sorted(f"adapters/{p.name}" for p in (run_dir / "adapters").glob("stage*.safetensors")),
    }
    metrics["summary"] = run_summary(metrics)
    if not main:
        return metrics
    if plot:
        from hybrid_lora.experiments.plots import plot_run

        metrics["plots"] = plot_run(metrics, run_dir / "plots", echo=echo)
    write_json(run_dir / "metrics.json", metrics)
    checkpoint.unlink(missing_ok=True)
    return metrics
