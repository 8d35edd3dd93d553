"""Layers over the op: ``LoRALayer`` and its two kinds, ``inject_lora``/``set_rank``, the scale rules, and
``accelerate``/``restore`` for peft models. Imports the op, nothing above it."""
