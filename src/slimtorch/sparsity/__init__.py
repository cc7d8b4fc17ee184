"""Sparsity: mask patterns and scores (masks.py), SparseGPT (sparsegpt.py)."""
