"""Evaluation of lip-sync output: pure metric functions (metrics.py) behind `lipsync eval`."""
