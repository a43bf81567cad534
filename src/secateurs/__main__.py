"""``python -m secateurs``: the command line, where the ``secateurs`` script is not installed."""

import sys

from .cli import main

sys.exit(main())
