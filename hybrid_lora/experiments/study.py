"""The continual study: the method against the baselines, their lambda sweeps and the ablations, over
three conflicting domains in two orders and three seeds (``hybrid-lora compare --study``).

Every arm is a variant with a few settings (``Arm``); every (arm, order, seed) is one ``train`` run in
its own process and folder, ``<out>/<arm>/<order>/seed-<seed>``. The one-adapter-per-domain bound is
one single-domain run per (domain, seed), ``<out>/per_domain/<domain>/seed-<seed>``: the same runs serve
every order, as each domain starts from a fresh adapter. Runs that finished are kept (``--resume``),
so an interrupted study continues where it stopped.

From the accuracy matrices R[t][i] (accuracy on domain i after stage t) each run gives

    average accuracy  mean_i R[T-1][i]
    BWT               mean_{i<T-1} R[T-1][i] - R[i][i]            (Lopez-Paz & Ranzato, 2017)
    forgetting        mean_{i<T-1} max_{i<=t<T-1} R[t][i] - R[T-1][i]  (Chaudhry et al., 2018)
    new-domain acc    mean_{t>=1} R[t][t]: what each later stage learned, where the regularisers act

and, from each stage's rank-quality curve (``train.rank_curve``: the share of the stage's gain in eval
loss that each lower rank keeps),

    rank AURAC        mean over stages of the curve's area over log2 rank (1: every rank as good as the final)
    worst rank        min over stages and swept ranks of the gain kept (< 0: a rank worse than the base)

and the study reports each as mean ± std over seeds. Methods are compared on the plane of forgetting
against new-domain accuracy (Biderman et al., 2024, "LoRA Learns Less and Forgets Less"): any method
that learns less also forgets less, so a regulariser is better only if it forgets less at the same
new-domain accuracy as the others' sweeps.
"""

from dataclasses import dataclass
from pathlib import Path

from hybrid_lora.experiments.summary import cell, mean_std
from hybrid_lora.io.atomic import read_json, write_json, write_text
from hybrid_lora.train.rank_curve import rank_curves

ORDERS = {
    "a-b-c": ("embedded-a", "embedded-b", "embedded-c"),
    "c-b-a": ("embedded-c", "embedded-b", "embedded-a"),
}
PER_DOMAIN = "per_domain"


@dataclass(frozen=True)
class Arm:
    """One line of the study. flags: ``train`` flags on top of the variant's settings."""
    name: str
    variant: str
    role: str  # "method", "baseline", "reference" (stores old data), "bound", "sweep", "ablation"
    # or "sampler" (a --dylora mode of the method)
    flags: tuple = ()
    every_order: bool = True  # False: the first order only (sweeps and ablations)


@dataclass(frozen=True)
class Plan:
    name: str
    arms: tuple
    orders: tuple  # keys of ORDERS
    seeds: tuple
    train_examples: int  # per domain
    eval_examples: int  # per domain

    def arm(self, name):
        return next(arm for arm in self.arms if arm.name == name)


# Each regulariser's weights and lora_only's learning rates: the middle one runs on every order, the other
# two on the first. Chosen on two domains (600 examples each) to span plain LoRA's learning down to little.
DC_LAMBDAS = (0.1, 0.3, 1.0)  # 0.3 is the default
L2_LAMBDAS = (1e-4, 3e-4, 1e-3)
EWC_LAMBDAS = (3e4, 1e5, 3e5)
LORA_LRS = (3e-4, 1e-3, 3e-3)  # 1e-3 is the embedded base's


def _sweep(name, variant, flag, values):
    return tuple(Arm(f"{name}-{value:g}", variant, "sweep", (flag, f"{value:g}"), False) for value in values)


MAIN_ARMS = (
    Arm("hybrid", "hybrid", "method"),
    Arm("lora_only", "lora_only", "baseline"),
    Arm("l2", "l2", "baseline", ("--lambda-l2", f"{L2_LAMBDAS[1]:g}")),
    Arm("ewc", "ewc", "baseline", ("--lambda-ewc", f"{EWC_LAMBDAS[1]:g}")),
    Arm("replay", "replay", "reference", ("--replay-fraction", "0.02")),
    Arm(PER_DOMAIN, "lora_only", "bound"),
)
SWEEP_ARMS = (
    *_sweep("hybrid-dc", "hybrid", "--lambda-dc", DC_LAMBDAS[::2]),
    *_sweep("l2", "l2", "--lambda-l2", L2_LAMBDAS[::2]),
    *_sweep("ewc", "ewc", "--lambda-ewc", EWC_LAMBDAS[::2]),
    *_sweep("lora_only-lr", "lora_only", "--lr", LORA_LRS[::2]),
)
ABLATION_ARMS = (
    Arm("hybrid-no-order", "hybrid", "ablation", ("--lambda-order", "0"), False),
    Arm("hybrid-no-schedule", "hybrid", "ablation", ("--rank-schedule",), False),
    Arm("hybrid-no-dc", "dy_only", "ablation", (), False),
)

# The rank samplers of ``--dylora`` (train.dynamic_rank) on the hybrid, each named, and lora_only: the same
# tokens per run, so that the rank curve and the continual scores compare at matched data.
SAMPLERS = ("nested", "full", "log-uniform", "multi-rank", "doubling")
SAMPLER_ARMS = (
    *(Arm(f"hybrid-{mode}", "hybrid", "sampler", ("--dylora", mode)) for mode in SAMPLERS),
    Arm("lora_only", "lora_only", "baseline"),
)

PLANS = {
    "full": Plan("full", MAIN_ARMS + SWEEP_ARMS + ABLATION_ARMS, ("a-b-c", "c-b-a"), (42, 43, 44), 600, 300),
    # The main arms on one order and seed, at the full plan's size: its numbers are the full plan's runs.
    "quick": Plan("quick", MAIN_ARMS, ("a-b-c",), (42,), 600, 300),
    # The quick study's order and size, one arm per rank sampler, three seeds.
    "samplers": Plan("samplers", SAMPLER_ARMS, ("a-b-c",), (42, 43, 44), 600, 300),
}


@dataclass(frozen=True)
class StudyRun:
    arm: str
    order: str  # a key of ORDERS, or for the bound the one domain
    seed: int
    argv: tuple  # ``python -m hybrid_lora`` arguments

    @property
    def name(self):
        return f"{self.arm} {self.order} seed {self.seed}"

    def folder(self, out_dir):
        return run_folder(out_dir, self.arm, self.order, self.seed)


# The ranks every stage is evaluated at besides its final one, for the rank curve: one point in two octaves.
SWEEP_RANKS = ("1", "4", "16")


def run_folder(out_dir, arm, where, seed):
    """The folder of one run: `where` is its order, or for the bound its one domain."""
    return Path(out_dir) / arm / where / f"seed-{seed}"


def runs(plan, out_dir, runtime=()):
    """Every run of `plan`, bound runs first (they are short); runtime: flags every run gets (device...)."""
    common = ("--train-examples", str(plan.train_examples), "--eval-examples", str(plan.eval_examples),
              "--sweep-ranks", *SWEEP_RANKS, "--no-plots", "--resume", *runtime)
    out = []
    for arm in plan.arms:
        if arm.role == "bound":
            domains = sorted({d for order in plan.orders for d in ORDERS[order]})
            for domain in domains:
                for seed in plan.seeds:
                    argv = ("train", "--variant", arm.variant, *arm.flags, "--domains", domain, "--seeds", str(seed),
                            "--out", str(Path(out_dir) / arm.name / domain), *common)
                    out.append(StudyRun(arm.name, domain, seed, argv))
    for arm in plan.arms:
        if arm.role == "bound":
            continue
        for order in plan.orders if arm.every_order else plan.orders[:1]:
            for seed in plan.seeds:
                argv = ("train", "--variant", arm.variant, *arm.flags, "--domains", *ORDERS[order],
                        "--seeds", str(seed), "--out", str(Path(out_dir) / arm.name / order), *common)
                out.append(StudyRun(arm.name, order, seed, argv))
    return out


def run_scores(accuracy):
    """The study's numbers of one accuracy matrix R[t][i] (T >= 2)."""
    T = len(accuracy)
    final = accuracy[-1]
    earlier = range(T - 1)
    return {
        "average_accuracy": sum(final) / T,
        "bwt": sum(final[i] - accuracy[i][i] for i in earlier) / (T - 1),
        "forgetting": sum(max(accuracy[t][i] for t in range(i, T - 1)) - final[i] for i in earlier) / (T - 1),
        "new_accuracy": sum(accuracy[t][t] for t in range(1, T)) / (T - 1),
    }


def bound_matrix(own, domains):
    """R of one adapter per domain, each domain evaluated with its own: R[t][i] = own[i] for i <= t.

    Entries for domains not yet trained (i > t) are None: with no adapter of its own yet, the bound
    does not define them, and no score reads them.
    """
    return [[own[d] if i <= t else None for i, d in enumerate(domains)] for t in range(len(domains))]


def _bound_own(out_dir, arm, seed, domains):
    own = {}
    for domain in domains:
        path = run_folder(out_dir, arm, domain, seed) / "metrics.json"
        if not path.is_file():
            return None
        own[domain] = read_json(path)["accuracy"][0][0]
    return own


def collect(plan, out_dir):
    """{arm: {order: {seed: accuracy matrix}}} of the finished runs under out_dir."""
    found = {}
    for arm in plan.arms:
        orders = plan.orders if arm.every_order else plan.orders[:1]
        for order in orders:
            for seed in plan.seeds:
                if arm.role == "bound":
                    own = _bound_own(out_dir, arm.name, seed, ORDERS[order])
                    matrix = None if own is None else bound_matrix(own, ORDERS[order])
                else:
                    path = run_folder(out_dir, arm.name, order, seed) / "metrics.json"
                    matrix = read_json(path)["accuracy"] if path.is_file() else None
                if matrix is not None:
                    found.setdefault(arm.name, {}).setdefault(order, {})[seed] = matrix
    return found


def curve_scores(metrics):
    """The rank AURAC and the worst rank's gain kept of one run (see the module docstring); None without
    a sweep."""
    curves = rank_curves(metrics)
    aurac = [c["loss_aurac"] for c in curves]
    worst = [c["loss_worst_gain_kept"] for c in curves]
    return {"rank_aurac": sum(aurac) / len(aurac) if curves and None not in aurac else None,
            "worst_rank_gain": min(worst) if curves and None not in worst else None}


def collect_curves(plan, out_dir):
    """{arm: {order: {seed: curve_scores}}} of the finished runs under out_dir (the bound has none)."""
    found = {}
    for arm in plan.arms:
        if arm.role == "bound":
            continue
        for order in plan.orders if arm.every_order else plan.orders[:1]:
            for seed in plan.seeds:
                path = run_folder(out_dir, arm.name, order, seed) / "metrics.json"
                if path.is_file():
                    found.setdefault(arm.name, {}).setdefault(order, {})[seed] = curve_scores(read_json(path))
    return found


SCORES = ("average_accuracy", "bwt", "forgetting", "new_accuracy")
CURVE_SCORES = ("rank_aurac", "worst_rank_gain")


def summarise(plan, matrices, curves=None):
    """Per arm and order: mean ± std over seeds of every score (and of the curve scores, from ``collect_curves``),
    and the mean R matrix."""
    table = {}
    for arm, by_order in matrices.items():
        for order, by_seed in by_order.items():
            scores = [run_scores(m) for m in by_seed.values()]
            T = len(ORDERS[order])
            mean_r = [[mean_std([m[t][i] for m in by_seed.values()])["mean"] for i in range(T)] for t in range(T)]
            by_curve = list(((curves or {}).get(arm, {}).get(order) or {}).values())
            table.setdefault(arm, {})[order] = {
                "role": plan.arm(arm).role, "seeds": sorted(by_seed),
                **{key: mean_std([s[key] for s in scores]) for key in SCORES},
                **{key: mean_std([c[key] for c in by_curve]) for key in CURVE_SCORES},
                "accuracy": mean_r,
            }
    return table


def markdown(plan, table, matrices=True):
    """The study's tables: scores per order, then (with `matrices`) the mean R matrix of every arm."""
    lines = []
    for order in plan.orders:
        arms = [arm for arm in plan.arms if order in table.get(arm.name, {})]
        if not arms:
            continue
        lines += [f"#### Order {' -> '.join(ORDERS[order])}", "",
                  "| arm | role | run as | seeds | average accuracy | BWT | forgetting | new-domain accuracy | "
                  "rank AURAC | worst rank's gain kept |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arm in arms:
            row = table[arm.name][order]
            settings = f"`{' '.join(arm.flags)}`" if arm.flags else "defaults"
            empty = {"mean": None}  # a table written before the curve scores existed
            lines.append(f"| {arm.name} | {arm.role} | `--variant {arm.variant}` {settings} | {len(row['seeds'])} | "
                         + " | ".join(cell(row.get(key, empty)) for key in SCORES + CURVE_SCORES) + " |")
        lines.append("")
    for order in plan.orders if matrices else ():
        for arm in plan.arms:
            row = table.get(arm.name, {}).get(order)
            if row is None or not arm.every_order:
                continue
            domains = ORDERS[order]
            seeds = len(row["seeds"])
            lines += [f"R of {arm.name}, order {' -> '.join(domains)} (mean over {seeds} seed{'s' * (seeds > 1)}; "
                      "row: after the stage, column: evaluated on)", "",
                      "| after | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
            for t, values in enumerate(row["accuracy"]):
                lines.append(f"| {domains[t]} | " + " | ".join("—" if v is None else f"{v:.4f}" for v in values)
                             + " |")
            lines.append("")
    return "\n".join(lines)


def pareto_points(plan, table):
    """One point per arm on the first order (where every arm ran): forgetting against new-domain accuracy."""
    order = plan.orders[0]
    # A regulariser's weights, or lora_only's learning rates, draw one curve: its main arm and its sweep.
    return [{"label": f"{arm.name} ({arm.role})", "role": arm.role,
             "family": arm.variant if arm.role in ("method", "baseline", "sweep") else None,
             "forgetting": (table[arm.name][order]["forgetting"]["mean"], table[arm.name][order]["forgetting"]["std"]),
             "new": (table[arm.name][order]["new_accuracy"]["mean"], table[arm.name][order]["new_accuracy"]["std"])}
            for arm in plan.arms if order in table.get(arm.name, {})]


def write_summary(plan, out_dir, plot=True, echo=print):
    """study.json, study.md and (with matplotlib) pareto.png in out_dir, from the runs finished there."""
    out_dir = Path(out_dir)
    table = summarise(plan, collect(plan, out_dir), collect_curves(plan, out_dir))
    text = markdown(plan, table)
    write_json(out_dir / "study.json", {"plan": plan.name, "orders": {k: ORDERS[k] for k in plan.orders},
                                        "seeds": list(plan.seeds), "train_examples": plan.train_examples,
                                        "eval_examples": plan.eval_examples,
                                        "arms": {arm.name: {"variant": arm.variant, "role": arm.role,
                                                            "flags": list(arm.flags)} for arm in plan.arms},
                                        "table": table})
    write_text(out_dir / "study.md", text)
    if plot:
        from hybrid_lora.experiments.plots import plot_tradeoff

        order = " -> ".join(ORDERS[plan.orders[0]])
        plot_tradeoff(pareto_points(plan, table), out_dir / "pareto.png", echo=echo,
                      xlabel=f"forgetting of earlier domains (order {order})",
                      ylabel="new-domain accuracy (stages 2 and 3)")
    return table
