"""Triton kernels of hybrid-lora and their launchers (installed as ``hybrid_lora.kernels``).

This package holds the kernels and nothing else: no autograd, no validation of
user input (``hybrid_lora.function`` does that). Every kernel has a plain
PyTorch twin in ``hybrid_lora.reference``.
"""

from .lora_forward import lora_forward
from .lora_backward import lora_backward
from .dropout import dropout_keep_mask
from .configs import rank_block

__all__ = ["lora_forward", "lora_backward", "dropout_keep_mask", "rank_block"]
