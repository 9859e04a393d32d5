"""Benchmarks of shapstream's moving parts (`shapstream bench ...`)."""
