"""Benchmarks of the REE ops (SPEC §6): `python benchmarks/run.py --help`."""
