"""What a run carries from step to step: the training state a checkpoint saves, and an epoch's sums."""

from dataclasses import dataclass, field

import torch

from hybrid_lora.train.dynamic_rank import RankSampler


@dataclass
class TrainingState:
    """Everything a run carries across steps, epochs and stages: what a checkpoint saves besides the adapters.

    (stage, epoch, batch) is what comes next: the micro-batch `batch` of epoch
    `epoch` of stage `stage`; epoch == config.epochs means the stage's epochs are
    done and its end-of-stage evaluation is not.
    """

    sampler: RankSampler
    stage: int = 0
    epoch: int = 0
    batch: int = 0
    global_step: int = 0  # optimizer steps over the whole run
    history: list = field(default_factory=list)
    initial: list = None  # each domain before training
    accuracy: list = field(default_factory=list)  # rows R[t] of finished stages
    loss: list = field(default_factory=list)
    rank_sweep: list = field(default_factory=list)
    snapshot: object = None  # AdapterSnapshot for L_DC in the current stage, or None
    ewc: object = None  # EWCAnchor of the earlier stages, or None
    own_eval: dict = None  # the current domain's eval after the latest epoch
    epoch_totals: object = None  # EpochTotals of the epoch in progress, when resuming inside one
    optimizer_state: tuple = None  # (tensors, param groups) of the stage in progress, when resuming
    checkpointer: object = None  # Checkpointer or None


@dataclass
class EpochTotals:
    """Sums kept on the device during an epoch, so the step loop never waits for the host."""

    ce: torch.Tensor
    order: torch.Tensor
    dc: torch.Tensor
    tokens: torch.Tensor
    skipped: torch.Tensor  # steps skipped as non-finite (their losses are not in the sums)
    steps: int = 0
    logged_ce: float = 0.0  # ce, steps and skipped steps at the latest step row
    logged_steps: int = 0
    logged_skipped: int = 0
    seconds: float = 0.0  # training time of the epoch before a resume

    @classmethod
    def zeros(cls, device):
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(3)),
                   *(torch.zeros((), dtype=torch.int64, device=device) for _ in range(2)))

    def tensors(self):
        return {"totals.ce": self.ce, "totals.order": self.order, "totals.dc": self.dc, "totals.tokens": self.tokens,
                "totals.skipped": self.skipped}

    def scalars(self):
        return {"steps": self.steps, "logged_ce": self.logged_ce, "logged_steps": self.logged_steps,
                "logged_skipped": self.logged_skipped, "seconds": self.seconds}
