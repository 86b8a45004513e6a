"""Benchmarks: run as modules from the repository root, e.g. `python -m bench.download` (a script path would put bench/ on sys.path, where bench/tokenize.py hides the standard library module)."""
