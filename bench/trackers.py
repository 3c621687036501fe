"""Experiment trackers: every finished trial's hyper-parameters, curves and final metrics sent to TensorBoard or MLflow.

    learnbench run SUITE --log tensorboard --log mlflow          # or --log mlflow=http://host:5000, --log tensorboard=DIR
    [log]                                                         # in the suite file
    tensorboard = true                                            # or a folder
    mlflow = true                                                 # or a tracking URI ("sqlite:///mlflow.db", "file:./mlruns")

Defaults: TensorBoard writes one run folder per trial under `RUN_DIR/tensorboard/`; MLflow a local SQLite store
`RUN_DIR/mlflow.db` (MLflow 3 refuses a new file store unless `MLFLOW_ALLOW_FILE_STORE` is set; a `file:` URI you
give sets it) with experiment = the suite name and one MLflow run per trial. Curves use step = examples seen (the
DESIGN rule: never raw steps, which mean a minibatch for one algorithm and a generation for another).

The trackers run in the driver process after the store has recorded the trial (`ProgressView.on_finish`), so they
work with every executor and a tracker that fails cannot lose a trial: its error is one warning line on stderr and the
run goes on. The tracker packages (the `learnbench[track]` extra) are imported only when a tracker is asked for.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Protocol

from .errors import UsageError, did_you_mean
from .trial import Trial, TrialResult

EXTRA = "pip install 'learnbench[track]'"
PACKAGES = {"tensorboard": ("tensorboard", "TensorBoard"), "mlflow": ("mlflow", "MLflow")}  # name -> (module, shown)
MLFLOW_BATCH = 1000  # MLflow's log_batch limit: 1000 metrics, 100 params per request
MLFLOW_PARAMS = 100


class Tracker(Protocol):
    name: str

    def log_trial(self, trial: Trial, result: TrialResult) -> None: ...


# --- settings ----------------------------------------------------------------------------------------------------

def settings(table: Any, flags: list[str] | None) -> dict[str, str | None]:
    """The trackers asked for: {name: None (default place) | folder or URI}, from a suite's `[log]` table, then the
    `--log` flags (`name`, `name=WHERE`, `none` = drop the suite's). Checks the packages are installed: a usage error
    (exit 2) before anything runs."""
    asked: dict[str, str | None] = {}
    source: dict[str, str] = {}  # name -> how it was asked for, for the error message
    if table is not None:
        if not isinstance(table, dict):
            raise UsageError(f"[log] must be a table (tensorboard = true, mlflow = \"URI\"); got {table!r}")
        for name, value in table.items():
            _known(name, "[log]")
            if value is True or (isinstance(value, str) and value):
                asked[name], source[name] = (None if value is True else value), f"[log] {name}"
            elif value is not False:
                raise UsageError(f"[log] {name} must be true, false or a folder/URI string; got {value!r}")
    for flag in flags or []:
        name, sep, where = (part.strip() for part in flag.partition("="))
        if name == "none" and not sep:
            asked.clear()
            continue
        _known(name, "--log")
        if sep and not where:
            raise UsageError(f"--log {flag}: give a folder or URI after '=', or just --log {name}")
        asked[name], source[name] = where or None, f"--log {name}"
    for name in asked:
        module, shown = PACKAGES[name]
        if not installed(module):
            raise UsageError(f"{source[name]} needs {shown}, which is not installed: {EXTRA}")
    return asked


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (learnbench's import time stays the same)."""
    return importlib.util.find_spec(module) is not None


def _known(name: str, where: str) -> None:
    if name not in PACKAGES:
        raise UsageError(f"{where}: unknown tracker {name!r}{did_you_mean(name, PACKAGES)}; known: "
                         f"{', '.join(PACKAGES)} (--log none drops the suite's)")


def build(asked: Mapping[str, str | None], run_dir: Path, experiment: str) -> Trackers | None:
    """The trackers of `settings`, writing into `run_dir` by default; None when none is asked for. Nothing is
    imported or written until the first trial is logged."""
    made: list[Tracker] = []
    if "tensorboard" in asked:
        made.append(TensorBoardTracker(Path(asked["tensorboard"] or run_dir / "tensorboard")))
    if "mlflow" in asked:
        made.append(MLflowTracker(asked["mlflow"], run_dir, experiment))
    return Trackers(made) if made else None


class Trackers:
    """Several trackers behind one `log_trial` that never raises: a failure is one warning line on stderr."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log_trial(self, trial: Trial, result: TrialResult) -> None:
        for tracker in self.trackers:
            try:
                tracker.log_trial(trial, result)
            except Exception as exc:  # noqa: BLE001 - a tracker never breaks a run; the store has the trial
                text = " ".join(str(exc).split())[:300]
                print(f"learnbench: warning: {tracker.name} could not log {trial.describe()}: "
                      f"{type(exc).__name__}: {text}", file=sys.stderr, flush=True)


# --- what is logged ----------------------------------------------------------------------------------------------

def hparams(trial: Trial) -> dict[str, str | int | float | bool]:
    """The trial's hyper-parameters (nested tables flattened to dotted keys, lists and None as JSON) and what
    identifies the experiment: algorithm, label, dataset, model, budget, seed."""
    out: dict[str, str | int | float | bool] = {"algorithm": trial.algorithm, "label": trial.label,
                                                "dataset": _dataset_name(trial.dataset), "model": trial.model_label,
                                                "budget": trial.budget.text(), "seed": trial.seed}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                add(f"{prefix}.{key}", inner)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value, default=str)

    for key, value in trial.hparams.items():
        add(key, value)
    return out


def run_name(trial: Trial) -> str:
    """`backprop_digits_mlp-16x1_s0_3f9a1c2e`: readable, unique per trial (the id's prefix), safe as a folder."""
    text = f"{trial.label}_{_dataset_name(trial.dataset)}_{trial.model_label}_s{trial.seed}_{trial.id[:8]}"
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text)


def _dataset_name(dataset: str) -> str:
    return Path(dataset).name.removesuffix(".npz")  # own data are absolute .npz paths


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _final_examples(result: TrialResult) -> int:
    examples = result.metrics.get("cost/examples")
    if _finite(examples):
        return int(examples)
    return max((p.examples for p in result.curves), default=0)


# --- TensorBoard -------------------------------------------------------------------------------------------------

class TensorBoardTracker:
    """One run folder per trial under `root` (`tensorboard --logdir root`): every curve as scalars with step =
    examples seen, and `add_hparams` (hyper-parameters; final metrics as `final/<name>`) in the same folder, so the
    HParams dashboard links them. A rerun of a trial replaces its folder, as the store replaces its rows."""

    name = "tensorboard"

    def __init__(self, root: Path):
        self.root = root

    def log_trial(self, trial: Trial, result: TrialResult) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = self.root / run_name(trial)
        if folder.is_dir():
            shutil.rmtree(folder)
        final = {f"final/{k}": float(v) for k, v in result.metrics.items() if _finite(v)}
        with SummaryWriter(log_dir=str(folder)) as writer:
            for point in result.curves:
                if _finite(point.value):
                    writer.add_scalar(point.metric, point.value, global_step=point.examples)
            # run_name "." keeps the hparams in the trial's folder, not a timestamped subfolder
            writer.add_hparams(hparams(trial), final, run_name=".", global_step=_final_examples(result))


# --- MLflow ------------------------------------------------------------------------------------------------------

class MLflowTracker:
    """One MLflow run per trial in the experiment named for the suite: params = `hparams(trial)`, metrics = the
    curves and the final metrics with step = examples seen, tags = trial id, label, algorithm, dataset, model, seed,
    status (and the error's last line). `uri` None: a local SQLite store `RUN_DIR/mlflow.db`, artifacts beside it."""

    name = "mlflow"

    def __init__(self, uri: str | None, run_dir: Path, experiment: str):
        self.local = uri is None
        self.uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}" if uri is None else uri
        self.artifacts = (run_dir / "mlartifacts").resolve().as_uri() if uri is None else None
        self.experiment = experiment
        self._client: Any = None
        self._experiment_id: str | None = None

    def client(self) -> Any:
        if self._client is None:
            import logging

            if self.uri.startswith("file:") or "://" not in self.uri:  # asked for a file store explicitly
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            if self.uri.startswith(("http://", "https://")):  # an unreachable server costs seconds, not minutes
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
            logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SQLAlchemy deprecation notices from MLflow's store
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            client = self.client()
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                self._experiment_id = client.create_experiment(self.experiment, artifact_location=self.artifacts)
            else:
                if found.lifecycle_stage == "deleted":
                    client.restore_experiment(found.experiment_id)
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def log_trial(self, trial: Trial, result: TrialResult) -> None:
        from mlflow.entities import Metric, Param

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client = self.client()
            run = client.create_run(self.experiment_id(), run_name=run_name(trial), tags=self._tags(trial, result))
            run_id = run.info.run_id
            now = int(time.time() * 1000)
            metrics = [Metric(p.metric, float(p.value), now, int(p.examples)) for p in result.curves if _finite(p.value)]
            logged = {(m.key, m.step) for m in metrics}
            step = _final_examples(result)
            metrics += [Metric(k, float(v), now, step) for k, v in result.metrics.items()
                        if _finite(v) and (k, step) not in logged]
            params = [Param(k, str(v)) for k, v in hparams(trial).items()]
            for start in range(0, len(params), MLFLOW_PARAMS):
                client.log_batch(run_id, params=params[start:start + MLFLOW_PARAMS])
            for start in range(0, len(metrics), MLFLOW_BATCH):
                client.log_batch(run_id, metrics=metrics[start:start + MLFLOW_BATCH])
            client.set_terminated(run_id, status="FINISHED" if result.status == "done" else "FAILED")

    @staticmethod
    def _tags(trial: Trial, result: TrialResult) -> dict[str, str]:
        tags = {"trial_id": trial.id, "label": trial.label, "algorithm": trial.algorithm,
                "dataset": _dataset_name(trial.dataset), "model": trial.model_label, "seed": str(trial.seed),
                "status": result.status, "suite": trial.suite or ""}
        lines = (result.error or "").strip().splitlines()
        if lines:
            tags["error"] = lines[-1][:500]  # a traceback's last line names the exception
        return tags
