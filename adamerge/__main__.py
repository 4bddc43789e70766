"""``python -m adamerge`` is the ``adamerge`` command."""

import sys

from adamerge.app.cli import main

sys.exit(main())
