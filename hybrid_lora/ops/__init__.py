"""The op: ``fused_lora`` and its custom ops over the Triton kernels, the choice between the kernels and the
PyTorch path, and the plain PyTorch reference every kernel is tested against. Imports only ``hybrid_lora.kernels``."""
