"""Third-party log messages that would mislead an offline ragkit user, filtered once at ``import ragkit``."""

from __future__ import annotations

import logging

# bitsandbytes (0.50) on CPUs with AVX512-BF16 tries, at import, to fetch a faster CPU kernel from the
# Hugging Face hub ("kernels-community") and logs a warning when it cannot, telling the user to
# `pip install kernels`. ragkit is offline by design, bitsandbytes then uses its own CPU kernel (what
# docs/llm.md measured), and the line would be the first one a CLI error prints instead of "Error: ...".
_BNB_CPU_OPS = "bitsandbytes.backends.cpu.ops"
_BNB_HUB_KERNEL = "from kernels-community"


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def filter_misleading_warnings() -> None:
    """Install the filters (idempotent); needs no third-party import."""
    logger = logging.getLogger(_BNB_CPU_OPS)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(_BNB_HUB_KERNEL))
