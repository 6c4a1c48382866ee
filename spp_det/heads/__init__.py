"""Heads on pooled features: per-class linear SVMs (fc7) and box regressors (pool5)."""
