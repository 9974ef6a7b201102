"""Benchmarks, one module per subject (`python -m hpcllm.bench <subject>`, see __main__.py);
common.py holds what they share. Figures, commands and machines are in benchmarks/."""
