"""Server-backed store URLs (``postgresql://...``): recognizing one and printing it without its password.

Kept free of heavy imports, so ``ragkit info`` and the CLI's first output line stay fast.
"""

from __future__ import annotations

import re
from typing import Any


def is_store_url(value: Any) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``, ``postgresql+psycopg2://``) URL."""
    return isinstance(value, str) and value.split(":", 1)[0] in ("postgresql", "postgres", "postgresql+psycopg2")


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***."""
    return re.sub(r"//([^:@/]+):[^@/]*@", r"//\1:***@", url)
