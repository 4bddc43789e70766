"""``python -m adamerge`` is the ``adamerge`` command."""

import sys

from adamerge.cli import main

sys.exit(main())
