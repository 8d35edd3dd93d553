"""Whether Triton runs its kernels on the CPU interpreter: the one test of ``TRITON_INTERPRET``.

Free of any triton import, so that the op can ask before deciding whether
Triton can run at all (the variable only counts if set before triton is
imported).
"""

import os


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
