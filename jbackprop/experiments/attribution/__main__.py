"""``python -m jbackprop.experiments.attribution``: see :func:`.cli.main`."""

import sys

from jbackprop.experiments.attribution.cli import main

sys.exit(main())
