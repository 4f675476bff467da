"""``python -m dass.cli``: the console script, as ``python -m dass`` is."""

import sys

from dass.cli import main

sys.exit(main())
