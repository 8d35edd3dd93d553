"""``python -m hybrid_lora``: the same command line as ``hybrid-lora``."""

import sys

from .cli import main

sys.exit(main())
