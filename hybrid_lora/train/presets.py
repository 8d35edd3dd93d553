"""Named sets of training settings, and the learning rate each base model trains at when none is given.

``TrainConfig``'s defaults are the method measured on the embedded corpus
(docs/experiment.md, "Choosing the defaults"). ``PRESETS["original"]`` puts back the
original experiment's settings: DyLoRA's frozen mode, scale alpha / r and
lr 5e-5 on every base. A preset sits under the variant's settings, which sit
under any field given explicitly.
"""

from hybrid_lora.io.models import EMBEDDED_MODEL, EMBEDDED_MODEL_DIR

ORIGINAL_LR = 5e-5  # the original experiment's, made for GPT-2 (124M)
# The tiny embedded base (d_model 128) barely moves at 5e-5 in three epochs; 1e-3 is what it trains at.
BASE_LR = {EMBEDDED_MODEL: 1e-3}

PRESETS = {
    "default": {},
    "original": {"lr": ORIGINAL_LR, "scale_rule": "alpha/r", "dylora": "frozen", "r_max": 64, "alpha": 32.0,
                 "lambda_order": 1e-4, "lambda_dc": 0.1},
}


def base_lr(model_name):
    """The learning rate for `model_name` when none is given: the embedded base's own, else the original's."""
    if model_name == EMBEDDED_MODEL or str(model_name) == str(EMBEDDED_MODEL_DIR):
        return BASE_LR[EMBEDDED_MODEL]
    return ORIGINAL_LR


def preset_fields(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
    return dict(PRESETS[name])
