"""Built-in training algorithms, one per file; each registers under the `learnbench.algorithms` entry point."""
