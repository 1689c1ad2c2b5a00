"""Shared pytest setup: make ``tests.support`` importable from every test, and check, after
the whole run, that it left nothing behind (:mod:`tests.support.debris`)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.debris import (  # noqa: E402 - needs ROOT on sys.path first
    pytest_sessionfinish,
    pytest_sessionstart,
    pytest_terminal_summary,
)

__all__ = ["pytest_sessionfinish", "pytest_sessionstart", "pytest_terminal_summary"]
