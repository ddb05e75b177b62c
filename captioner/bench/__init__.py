"""Benchmarks (`captioner bench ...`, `python -m captioner.bench.<name>`): ratios measured side by
side in one run, never timed assertions."""
