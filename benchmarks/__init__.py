"""Benchmarks of the REE ops (docs/spec.md §6): `python benchmarks/run.py --help`."""
