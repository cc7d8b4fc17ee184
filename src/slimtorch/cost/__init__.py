"""Roofline cost model: chip profiles (hardware.py) and per-layer FLOPs/bytes/time (roofline.py)."""
