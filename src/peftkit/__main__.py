"""`python -m peftkit ...` (also how torchrun launches training: `torchrun -m peftkit train ...`)."""

import sys

from .cli import main

sys.exit(main())
