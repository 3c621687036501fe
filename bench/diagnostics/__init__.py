"""Diagnostics probes the runner calls every N steps, off the training clock (see ARCHITECTURE.md)."""
