"""Model adapters, one sub-package per model family; `registry` maps model names to them."""
