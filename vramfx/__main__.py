"""``python -m vramfx``: the command line."""

import sys

from vramfx.cli import main

sys.exit(main())
