"""``python -m evals.regress``."""

import sys

from evals.regress.jobs import main

sys.exit(main())
