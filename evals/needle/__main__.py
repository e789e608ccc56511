"""``python -m evals.needle``."""

import sys

from evals.needle.suite import main

sys.exit(main())
