"""Adversarial robustness: one attack per file; `robustness.py` holds what the runner calls."""
