"""polyfm.ts: Tiny Time Mixers (TTM) for zero-shot and few-shot forecasting.

Imports are lazy so that ``import polyfm.ts`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "TTM": "polyfm.ts.models.ttm",
    "TTMConfig": "polyfm.ts.models.ttm",
    "head_only": "polyfm.ts.models.ttm",
    "FREQUENCY_TOKENS": "polyfm.ts.models.ttm",
    "WEIGHTS": "polyfm.ts.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'polyfm.ts' has no attribute {name!r}")
