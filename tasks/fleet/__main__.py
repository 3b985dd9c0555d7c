"""``python -m kiln.tasks.fleet``: run a model's replica set (:func:`kiln.tasks.fleet.fleet.main`)."""

import sys

from kiln.tasks.fleet.fleet import main

if __name__ == "__main__":
    sys.exit(main())
