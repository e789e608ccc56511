"""Lost in the middle: ``python -m evals.lost_in_middle`` (settings and execute in
:mod:`evals.lost_in_middle.suite`)."""
