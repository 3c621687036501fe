"""learnbench: a comparative benchmark of neural-network training algorithms.

Public API: the trainer contract (`Trainer`, `Batch`, `StepStats`, `TaskInfo`), `load_model` and `load_results`
(a run's tables as pandas DataFrames). They are imported on first use, so `learnbench show` and `learnbench list` do
not pay for importing torch or pandas.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("learnbench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["Batch", "StepStats", "TaskInfo", "Trainer", "load_model", "load_results", "__version__"]


def __getattr__(name: str):
    if name in ("Batch", "StepStats", "TaskInfo", "Trainer"):
        from . import spec

        return getattr(spec, name)
    if name == "load_model":
        from .artifacts import load_model

        return load_model
    if name == "load_results":
        from .export import load_results

        return load_results
    raise AttributeError(f"module 'learnbench' has no attribute {name!r}")
