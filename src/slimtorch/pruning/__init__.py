"""Structured pruning: remove whole neurons so that the model becomes a smaller dense model (graph.py finds
the coupled layers, structured.py removes them)."""
