"""The LoRA scale s of an adapter running at rank r: which rule, and what peft needs to reproduce it.

- ``alpha/r``: s = alpha / r (Hu et al., 2022, "LoRA"; peft's default; DyLoRA,
  Valipour et al., EACL 2023, scales a truncated rank b by alpha / b). At a
  fixed alpha, the update of the full adapter shrinks as r grows.
- ``rslora``: s = alpha / sqrt(r) (Kalajdzievski, 2023, "A Rank Stabilization
  Scaling Factor for Fine-Tuning with LoRA", arXiv 2312.03732), which keeps the
  size of the update steady across ranks.
- ``fixed``: s = alpha / r_max at every rank r, r_max being the width the
  adapter was trained at: the leading r components of a nested adapter keep
  the scale they were trained with, so running at rank r drops the later
  components and changes nothing else.
"""

import math

SCALE_RULES = ("alpha/r", "rslora", "fixed")
DEFAULT_RULE = "alpha/r"


def check_rule(rule):
    if rule not in SCALE_RULES:
        raise ValueError(f"scale rule {rule!r}; expected one of {SCALE_RULES}")
    return rule


def lora_scale(rule, alpha, rank, r_max):
    """The scale s of an adapter of width r_max (as trained) running at `rank` under `rule`."""
    check_rule(rule)
    if rule == "alpha/r":
        return alpha / rank
    if rule == "rslora":
        return alpha / math.sqrt(rank)
    return alpha / r_max


def peft_scale_fields(rule, alpha, rank, r_max):
    """{"lora_alpha", "use_rslora"} for peft's LoraConfig at `rank`, giving peft's scale equal to ``lora_scale``.

    peft computes lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; the
    fixed rule becomes lora_alpha = alpha * rank / r_max, as peft has no such rule.
    """
    check_rule(rule)
    if rule == "alpha/r":
        return {"lora_alpha": alpha, "use_rslora": False}
    if rule == "rslora":
        return {"lora_alpha": alpha, "use_rslora": True}
    return {"lora_alpha": alpha * rank / r_max, "use_rslora": False}
