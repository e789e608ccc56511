"""``python -m evals.lost_in_middle``."""

import sys

from evals.lost_in_middle.suite import main

sys.exit(main())
