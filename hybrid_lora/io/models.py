"""The base causal LM and its tokenizer, by name: a hub id (``gpt2``), a local checkpoint folder, or the embedded base.

Every name goes through the same ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` calls, so any causal LM that ``transformers``
loads (GPT-2, Llama, Qwen2, ...) can be the base; the embedded base is just a
folder shipped in the package (``hybrid_lora/assets/tiny-gpt2``, trained by
``scripts/train_tiny_base.py``). A tokenizer without a pad token pads with
EOS, as the original did for GPT-2.
"""

from pathlib import Path

import torch

from hybrid_lora.errors import BadValue, MissingFile, Unavailable

EMBEDDED_MODEL = "embedded"
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-gpt2"


def pick_device(device=None):
    """`device` as a torch.device; None or 'auto' means cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine")
    return device


def resolve_model(name_or_path):
    """The string to give from_pretrained: the embedded folder, a local folder, or a hub id.

    Raises FileNotFoundError for a path that does not exist (a name that starts
    with '.', '/' or '~', or that names a missing folder next to a config.json).
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise BadValue(f"model {name_or_path!r}: expected 'embedded', a hub id such as 'gpt2', or a checkpoint "
                       "folder")
    if name_or_path == EMBEDDED_MODEL:
        if not (EMBEDDED_MODEL_DIR / "config.json").is_file():
            raise MissingFile(f"the embedded model is missing from {EMBEDDED_MODEL_DIR} (reinstall the package)")
        return str(EMBEDDED_MODEL_DIR)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingFile(f"model folder {name_or_path!r} has no config.json; expected a checkpoint folder")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or path.exists():
        raise MissingFile(f"model folder {name_or_path!r} does not exist")
    return name_or_path  # a hub id such as "gpt2"


def from_pretrained(cls, name_or_path, **kwargs):
    """cls.from_pretrained(resolve_model(name_or_path)); a model that cannot be had raises Unavailable naming it."""
    location = resolve_model(name_or_path)
    try:
        return cls.from_pretrained(location, **kwargs)
    except OSError as err:  # transformers' "couldn't connect" and missing-file errors are OSErrors
        reason = " ".join(str(err).split())[:200]
        raise Unavailable(f"model {name_or_path!r} could not be loaded ({reason}); expected a checkpoint "
                          "folder, or a hub id downloaded once with network access (then read from the cache "
                          "with HF_HUB_OFFLINE=1)") from None


def load_tokenizer(name_or_path=EMBEDDED_MODEL):
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, name_or_path)
    if tokenizer.eos_token is None:
        raise BadValue(f"tokenizer of {name_or_path!r} has no EOS token; expected one (the data pads with EOS)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(name_or_path=EMBEDDED_MODEL, device=None, dtype=torch.float32, quantization=None):
    """(causal LM in `dtype` on `device`, its tokenizer), both from `name_or_path`; see ``load_causal_lm``."""
    model = load_causal_lm(name_or_path, dtype=dtype, quantization=quantization, device=device)
    tokenizer = load_tokenizer(name_or_path)
    return model.to(pick_device(device)), tokenizer


def load_causal_lm(name_or_path=EMBEDDED_MODEL, dtype=torch.float32, quantization=None, device="cpu"):
    """``AutoModelForCausalLM`` from `name_or_path` (see ``resolve_model``), on the CPU.

    A model whose config names no pad token gets EOS as its pad token, as its tokenizer does.
    With `quantization` (``quantization.Quantization``) the linear layers load in 4 bits, onto `device`.
    """
    from transformers import AutoModelForCausalLM

    extra = {}
    if quantization is not None:  # QLoRA: hybrid_lora/io/quantization.py
        from hybrid_lora.io.quantization import from_pretrained_kwargs

        extra = from_pretrained_kwargs(quantization, pick_device(device))
    try:
        model = from_pretrained(AutoModelForCausalLM, name_or_path, dtype=dtype, **extra)
    except ValueError as err:  # a config of no causal-LM architecture
        if isinstance(err, BadValue):
            raise
        raise BadValue(f"model {name_or_path!r}: not a causal LM that transformers can load ({err})") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def enable_activation_checkpointing(model):
    """Recompute each transformer block's activations in the backward (transformers' own checkpointing, not reentrant).

    A block then keeps only its input for the backward. Not reentrant: it
    needs no input that requires a gradient, so transformers' hook that makes
    the embeddings' output require one is taken off (it would break a
    compiled graph), and it runs under DDP without restrictions.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise BadValue(f"gradient checkpointing: {type(model).__name__} does not support it; expected a "
                       "transformers model whose blocks can be checkpointed (GPT-2, Llama, ...)")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers, where the older name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()
    return model
