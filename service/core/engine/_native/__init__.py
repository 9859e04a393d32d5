"""Compiled TreeSHAP kernel (built by setup.py from treeshap.c)."""
