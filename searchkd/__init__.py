"""searchkd: search how best to distill a teacher into a small student.

The library API (`searchkd.tune`, `resume`, `results`, `load_student`) lives in `searchkd.api`
and is imported on first use, so `import searchkd` stays light. The teacher cache and the final
stage are `searchkd.api.teacher` and `searchkd.api.final`: `searchkd.teacher` and
`searchkd.final` are the modules behind them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["SearchkdError", "load_student", "results", "resume", "tune"]


def __getattr__(name: str) -> Any:
    if name in __all__ or name == "api":
        api = importlib.import_module(f"{__name__}.api")
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'searchkd' has no attribute {name!r}")
