"""``python -m jbackprop.experiments.mnist``: see :func:`jbackprop.experiments.mnist.main`."""

import sys

from jbackprop.experiments.mnist.cli import main

sys.exit(main())
