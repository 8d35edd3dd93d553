"""A tiny Llama saved to a local folder and loaded back with its linear layers in 4 bits (bitsandbytes, CPU).

Imported by the QLoRA tests (which skip without bitsandbytes); not a test module itself.
"""

import torch

VOCAB = 64


def save_tiny_llama(folder, seed=0):
    """A 1-layer Llama (hidden 32, 2 heads) with random weights, saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_4bit(folder, quant_type="nf4", double_quant=True, compute_dtype=torch.float32):
    """The model in `folder` with every linear layer but the head a bnb ``Linear4bit``, on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32)


def token_batch(batch=2, length=7, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
