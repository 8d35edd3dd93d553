"""The op: ``fused_lora`` and its custom ops over the Triton kernels, the choice between the kernels and the
PyTorch path, the plain PyTorch reference every kernel is tested against, and the PyTorch path's fast dropout mask
(``philox``). Imports only ``hybrid_lora.kernels``."""
