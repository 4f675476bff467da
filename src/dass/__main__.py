"""``python -m dass`` (and ``torchrun -m dass``) runs the console script."""

import sys

from dass.cli import main

sys.exit(main())
