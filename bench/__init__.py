"""learnbench: a comparative benchmark of neural-network training algorithms.

Public API: the trainer contract (`Trainer`, `Batch`, `StepStats`, `TaskInfo`) and `load_model`.
"""

from importlib.metadata import PackageNotFoundError, version

from .spec import Batch, StepStats, TaskInfo, Trainer

try:
    __version__ = version("learnbench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["Batch", "StepStats", "TaskInfo", "Trainer", "load_model", "__version__"]


def load_model(run_dir, trial_id):
    """Rebuild a trial's final model from `RUN_DIR/models/<trial>.safetensors` and its `.json` (no pickle)."""
    from .artifacts import load_model as _load

    return _load(run_dir, trial_id)
