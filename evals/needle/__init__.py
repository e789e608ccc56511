"""Needle in a haystack: ``python -m evals.needle`` (settings and execute in :mod:`evals.needle.suite`).

Registers the suite (evals.core.registry); the model-side code is imported when a run needs it.
"""

from evals.core.registry import SuiteCode, SuiteRecord, register
from evals.needle.layout import LAYOUT


def _code() -> SuiteCode:
    from evals.needle import report, suite

    return SuiteCode(suite.NeedleSettings, suite.execute, report.write_needle_report, suite.rescore_row)


RECORD = register(SuiteRecord("needle", "python -m evals.needle", LAYOUT, _code))
