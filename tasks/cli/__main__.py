"""``python -m kiln.tasks.cli`` is ``kiln``."""

import sys

from kiln.tasks.cli.main import main

sys.exit(main())
