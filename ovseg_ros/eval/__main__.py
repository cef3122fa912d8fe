"""``python -m ovseg_ros.eval`` (and ``torchrun ... -m ovseg_ros.eval``) runs :func:`ovseg_ros.eval.cli.main`."""

import sys

from .cli import main

sys.exit(main())
