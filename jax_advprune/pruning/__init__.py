"""Per-sample importance scores and the selection strategies built on them."""
