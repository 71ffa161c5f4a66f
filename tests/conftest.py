"""Shared test setup: keep it small, several test files use it."""
from __future__ import annotations

import os
import sys

# Helper modules (tests/_funcs.py, ...) must import by plain name, both here and in
# env=None workers, which start with the parent's sys.path.
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
