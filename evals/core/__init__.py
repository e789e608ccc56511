"""Machinery every suite shares: cells and settings, the runner (in-process and served), the run
directory store, scoring, statistics, report helpers, baseline comparison, the model targets and errors."""
