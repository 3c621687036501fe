"""Benchmarks: `learnbench perf NAME` runs the module `learnbench.perf.NAME` (its `add_arguments` and `main`)."""
