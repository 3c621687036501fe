"""Trial artifacts: final weights as safetensors plus a JSON description, and the provenance of a result.

`RUN_DIR/models/<trial>.safetensors` holds the state dict; `RUN_DIR/models/<trial>.json` the model spec, input
shape and classes, so `load_model` rebuilds the module with `learnbench.models.build`. Nothing is pickled.

A trainer whose `eval_model()` wraps the trained model in a module of its own (Forward-Forward's goodness
classifier: the same weights, another forward) makes the wrapper JSON-describable: the wrapper has a method
`wrapper_args()` (a dict of JSON values), the trainer class a classmethod `wrap_eval_model(model, **args)` that
rebuilds it. The description then records the trainer's id and the arguments, and `load_model` rebuilds the model,
wraps it through the registered trainer class and loads the saved weights into the wrapper.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import models
from .errors import UsageError
from .trial import Trial


def save_model(run_dir: str | Path, trial: Trial, model: nn.Module, input_shape: tuple[int, ...],
               n_classes: int) -> Path:
    """Write weights and description atomically (temp file + os.replace), so a kill never leaves half a file."""
    folder = Path(run_dir) / "models"
    folder.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage, and weights may live on the GPU
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    target = folder / f"{trial.id}.safetensors"
    tmp = target.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp), metadata={"trial": trial.id})
    os.replace(tmp, target)
    description = {"trial": trial.id, "model": dict(trial.model), "model_label": trial.model_label,
                   "input_shape": list(input_shape), "n_classes": int(n_classes), "algorithm": trial.algorithm,
                   "dataset": trial.dataset, "seed": trial.seed}
    wrapper_args = getattr(model, "wrapper_args", None)
    if callable(wrapper_args):
        description["eval_wrapper"] = {"trainer": trial.algorithm, "args": wrapper_args()}
    tmp_json = folder / f"{trial.id}.json.tmp"
    tmp_json.write_text(json.dumps(description, indent=1))
    os.replace(tmp_json, folder / f"{trial.id}.json")
    return target


def load_model(run_dir: str | Path, trial_id: str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a trial's final model (eval mode) from its safetensors weights and JSON description."""
    folder = Path(run_dir) / "models"
    desc_path, weights = folder / f"{trial_id}.json", folder / f"{trial_id}.safetensors"
    if not desc_path.is_file() or not weights.is_file():
        raise UsageError(f"no saved model for trial {trial_id!r} in {folder}")
    desc = json.loads(desc_path.read_text())
    model = models.build(desc["model"], tuple(desc["input_shape"]), desc["n_classes"])
    if "eval_wrapper" in desc:
        model = _wrap(model, desc["eval_wrapper"], trial_id)
    model.load_state_dict(load_file(str(weights), device=str(device)))
    return model.to(device).eval()


def _wrap(model: nn.Module, wrapper: dict[str, Any], trial_id: str) -> nn.Module:
    """The trainer's own evaluation module around `model` (module docstring), the trainer found in the registry."""
    from .registry import discover

    entry = discover().entries.get(wrapper["trainer"])
    rebuild = getattr(entry.cls, "wrap_eval_model", None) if entry is not None else None
    if rebuild is None:
        raise UsageError(f"trial {trial_id!r}'s model is evaluated through {wrapper['trainer']!r}'s own module, and "
                         f"no installed trainer of that name rebuilds it (install the plugin that provides it)")
    return rebuild(model, **wrapper["args"])


def provenance(trial: Trial, device: torch.device) -> dict[str, Any]:
    """Where and with what a result was produced."""
    info = {
        "learnbench": _version("learnbench"), "git_commit": git_commit(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": _version("numpy"), "deap": _version("deap"), "cma": _version("cma"),
        "platform": platform.platform(), "host": socket.gethostname(), "device": str(device),
        "device_name": _device_name(device), "threads": torch.get_num_threads(), "plugin": dict(trial.plugin),
    }
    return info


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the source tree learnbench runs from (None for an installed wheel)."""
    source = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux: the CPU's marketing name says more than "x86_64"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()
