"""Lost in the middle: ``python -m evals.lost_in_middle`` (settings and execute in
:mod:`evals.lost_in_middle.suite`).

Registers the suite (evals.core.registry); the model-side code is imported when a run needs it.
"""

from evals.core.registry import SuiteCode, SuiteRecord, register
from evals.lost_in_middle.layout import LAYOUT


def _code() -> SuiteCode:
    from evals.lost_in_middle import report, suite

    return SuiteCode(suite.LitmSettings, suite.execute, report.write_report, suite.rescore_row)


RECORD = register(SuiteRecord("lost_in_middle", "python -m evals.lost_in_middle", LAYOUT, _code))
