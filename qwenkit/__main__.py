"""`python -m qwenkit` (and `torchrun ... -m qwenkit`) runs the CLI."""

import sys

from qwenkit.cli import main

sys.exit(main())
