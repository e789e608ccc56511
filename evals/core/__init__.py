"""Machinery every suite shares: the suite registry and the run skeleton, cells and settings, the runner
(in-process and served), the run directory store, scoring, statistics, report helpers, baseline comparison,
the model targets and errors. It names no suite: each registers itself (:mod:`evals.core.registry`)."""
