"""hybrid-lora: fused Triton LoRA with a runtime rank, for continual DyLoRA fine-tuning of causal LMs."""

from hybrid_lora import versions

versions.warn_if_untested()

from hybrid_lora.nn.layer import (LoRAConv1D, LoRALayer, LoRALinear, inject_lora, lora_layers,  # noqa: E402
                                  set_rank)
from hybrid_lora.nn.peft import accelerate, restore  # noqa: E402
from hybrid_lora.ops import reference  # noqa: E402
from hybrid_lora.ops.fused_lora import fused_lora  # noqa: E402
from hybrid_lora.nn.quantized import LoRALinear4bit  # noqa: E402  (QLoRA; imports no bitsandbytes)
from hybrid_lora.ops.fused_lora_4bit import fused_lora_4bit  # noqa: E402
from hybrid_lora.serve import AdapterBank  # noqa: E402

__version__ = "0.1.0"

__all__ = ["fused_lora", "fused_lora_4bit", "LoRALayer", "LoRAConv1D", "LoRALinear", "LoRALinear4bit", "inject_lora",
           "lora_layers", "set_rank", "accelerate", "restore", "reference", "AdapterBank", "__version__"]
