"""Needle in a haystack: ``python -m evals.needle`` (settings and execute in :mod:`evals.needle.suite`)."""
