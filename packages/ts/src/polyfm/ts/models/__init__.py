"""Model registry of polyfm.ts (the ``polyfm.models`` entry point)."""

from polyfm.ts.models.ttm import TTM, TTMConfig, head_only

MODELS: dict[str, type] = {"ttm": TTM}

__all__ = ["MODELS", "TTM", "TTMConfig", "head_only"]
