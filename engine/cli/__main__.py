"""``python -m brigade.engine.cli`` runs the ``brigade`` command."""

import sys

from . import main

sys.exit(main())
