"""Compiled TreeSHAP kernel and margin predictor of a Forest (built by setup.py)."""
