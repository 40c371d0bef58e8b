"""searchkd: search how best to distill a teacher into a small student.

The library API (`searchkd.tune`, `resume`, `results`, `load_student`, `teacher`) lives in
`searchkd.api` and is imported on first use, so `import searchkd` stays light; the final stage
is `searchkd.api.final` (`searchkd.final` is the module that runs it).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["SearchkdError", "load_student", "results", "resume", "teacher", "tune"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'searchkd' has no attribute {name!r}")
