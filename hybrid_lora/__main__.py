"""``python -m hybrid_lora``: the same command line as ``hybrid-lora``."""

import sys

from hybrid_lora.cli import main

sys.exit(main())
