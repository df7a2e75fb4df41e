"""``python -m haloseg``: the command line, as torchrun launches it."""

import sys

from haloseg.cli.main import main

sys.exit(main())
