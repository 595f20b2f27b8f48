"""`python -m valise` runs the `valise` command (the demo starts its daemons this way, with this interpreter)."""

import sys

from valise.cli.main import main

sys.exit(main())
