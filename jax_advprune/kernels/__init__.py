"""Custom kernels behind drop-in functions: oneDNN convolutions for XLA:CPU (`onednn`)."""
