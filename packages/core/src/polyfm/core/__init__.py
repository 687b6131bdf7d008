"""polyfm.core: the shared engine."""
