"""Scheduled regression jobs: ``python -m evals.regress`` (the job in :mod:`evals.regress.jobs`, the
history in :mod:`evals.regress.history`)."""
