"""Running trials on a Ray cluster (`--executor ray [--address ADDR]`): one Ray task per trial.

* Resources: each task declares `num_cpus` and `num_gpus` from the suite's `[resources]` table (or
  `--set resources.cpus=2`); by default one trial takes the executor's threads per trial on CPU, and one CPU and one
  GPU on CUDA. The task runs torch with as many threads as CPUs it was given, so Ray's packing is the real one.
  With `resources.actors = N` (Ray actors that evaluate population methods' members: `learnbench.population_ray`),
  every trial gets a placement group: its task's bundle plus N 1-CPU bundles, reserved together (the actors land in
  it because the group captures the task's children), so a trial never holds its CPUs while waiting for actors that
  cannot start. The executor knows no algorithm: a trial that starts no actors (backprop) still holds the bundles.
* The driver alone writes the store: a task returns its result as JSON text (the same dict `run_trial` returns to
  the local executor) and its final weights as raw safetensors bytes. The driver writes the weights into
  RUN_DIR/models (temp file + rename) before recording the trial, so the run directory need not be on a shared file
  system, and the post-run phases (the transfer attack reads the backprop models) find every model on the driver.
  Weights of the built-in models are kilobytes to a few megabytes: the object store carries them easily.
* Results are recorded as each task finishes (`ray.wait`), so a killed driver loses no finished trial and rerunning
  the same command resumes, as with the local executor. A task whose worker dies (killed, out of memory, its node
  preempted) fails its trial with Ray's reason; the run goes on. Tasks are not retried by default (`max_retries=0`):
  a trial that killed its worker once usually does again, and a rerun retries every failed trial anyway.
* Progress: tasks report their budget fraction (at most twice a second) to a small actor that the driver drains
  while it waits, so the per-trial bars of `ProgressView` work as with local workers; a trial's bar (and its
  `running` status in the store) starts when its task starts on a worker, not when it is queued.

Ray's own transport serialises task arguments and return values with (cloud)pickle between the driver and its own
cluster; what crosses it here is JSON text and bytes only, never objects a trainer built.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .executor import ProgressView
from .store import Store
from .trial import Trial, TrialResult

if TYPE_CHECKING:  # an optional extra: annotations only
    import ray

INSTALL_HINT = "pip install 'learnbench[ray]'"
PROGRESS_INTERVAL_S = 0.5  # a task sends at most two progress messages a second
_STARTED_LOCALLY = False  # this process started the Ray instance it uses (no --address)


def import_ray() -> ModuleType:
    """The `ray` module, or a UsageError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def connect(address: str | None, trials: list[Trial], threads: int | None = None) -> str:
    """Join the Ray cluster at `address` ("auto", "host:port", "ray://host:10001"), or start a local instance with
    this machine's cores (a Ray this process already initialised is used as it is); check that some node can hold
    each trial. Returns a one-line description. Called before anything is written, so every problem here is a
    UsageError (exit code 2)."""
    global _STARTED_LOCALLY
    ray = import_ray()
    if not ray.is_initialized():
        quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address:
            _check_reachable(address)
            try:
                ray.init(address=address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UsageError(f"--address {address}: cannot join the Ray cluster: {exc} (same Ray version here? "
                                 "a cluster with token authentication also needs RAY_AUTH_MODE=token and its "
                                 "token here: see the README, Running on a cluster)") from None
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
            _STARTED_LOCALLY = True
    largest = _largest_node(ray)
    total = ray.cluster_resources()
    for trial in trials:
        cpus, gpus = task_resources(trial, threads or 1, largest)
        if cpus > largest["CPU"] or gpus > largest["GPU"]:
            raise UsageError(f"no node of the Ray cluster can run a trial that needs {cpus:g} CPU(s) and "
                             f"{gpus:g} GPU(s) (the largest node has {largest['CPU']:g} CPU(s) and "
                             f"{largest['GPU']:g} GPU(s)); lower resources.cpus/resources.gpus or add nodes")
        if trial.data_parallel > 1 and trial.data_parallel * rank_cpus(trial, cpus) > total.get("CPU", 0):
            raise UsageError(f"a {trial.label} trial runs as {trial.data_parallel} processes of "
                             f"{rank_cpus(trial, cpus):g} CPU(s) each; the Ray cluster has {total.get('CPU', 0):g}: "
                             "lower data_parallel or add nodes")
        if trial.data_parallel > 1 and on_cuda(trial) and trial.data_parallel > total.get("GPU", 0):
            raise UsageError(f"a {trial.label} trial runs as {trial.data_parallel} processes of one GPU each; the "
                             f"Ray cluster has {total.get('GPU', 0):g} GPU(s)")
        if cpus + actors(trial) > total.get("CPU", 0):
            raise UsageError(f"a {trial.label} trial needs {cpus:g} CPU(s) and one per actor "
                             f"(resources.actors={actors(trial)}); the Ray cluster has "
                             f"{total.get('CPU', 0):g}: lower resources.actors or add nodes")
    where = "local Ray instance" if _STARTED_LOCALLY else f"Ray cluster {address or 'already connected'}"
    return (f"{where}: {len(ray.nodes())} node(s), {total.get('CPU', 0):g} CPU(s), "
            f"{total.get('GPU', 0):g} GPU(s)")


def _check_reachable(address: str) -> None:
    """Ray retries an unreachable head for minutes; a TCP probe answers in seconds."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UsageError(f"--address {address}: no Ray head answers at {host}:{port} ({exc.strerror or exc}); "
                         "start one with `ray start --head`") from None


def _largest_node(ray) -> dict[str, float]:
    """The most CPUs and the most GPUs any one alive node has (a task runs on one node)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return {key: max((n.get(key, 0.0) for n in nodes), default=0.0) for key in ("CPU", "GPU")}


def task_resources(trial: Trial, threads: int, largest: dict[str, float]) -> tuple[float, float]:
    """(num_cpus, num_gpus) of one trial's task: the suite's `[resources]`, else `threads` CPUs on CPU (at most a
    whole node) and one CPU and one GPU on CUDA."""
    wanted = trial.resources
    on_cuda = trial.device.startswith("cuda")
    cpus = wanted.get("cpus")
    if cpus is None:
        cpus = 1 if on_cuda else max(1, min(threads, int(largest["CPU"]) or 1))
    gpus = wanted.get("gpus")
    if gpus is None:
        gpus = 1 if on_cuda else 0
    return float(cpus), float(gpus)


def on_cuda(trial: Trial) -> bool:
    return trial.device.startswith("cuda")


def rank_cpus(trial: Trial, cpus: float) -> float:
    """CPUs of each Ray Train worker of a data-parallel trial: the trial's CPUs shared out, at least one each."""
    return float(max(1, math.floor(cpus / trial.data_parallel)))


def actors(trial: Trial) -> int:
    """Ray actors (one CPU each) the runner may start for the trial: its `resources.actors` (absent in old stores)."""
    return int(trial.resources.get("actors") or 0)


def placement(ray, trial: Trial, cpus: float, gpus: float) -> tuple[dict[str, Any], Any]:
    """(task options, placement group or None): a trial with actors gets a group of its task's bundle and one
    {"CPU": 1} bundle per actor (PACK: on as few nodes as fit); the task and every actor it starts run inside."""
    if not actors(trial):
        return {}, None
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    head = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v}
    group = placement_group([head] + [{"CPU": 1.0}] * actors(trial), strategy="PACK")
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=True)
    return {"scheduling_strategy": strategy}, group


def run_ray(trials: list[Trial], store: Store, run_dir: str, data_dir: str | None, threads: int,
            progress: ProgressView, max_retries: int = 0) -> None:
    """Run `trials` (registered as pending) as Ray tasks and record each result as it arrives. Needs `connect`
    (or any `ray.init`) first."""
    if not trials:
        return
    ray = import_ray()
    tracker = ray.remote(num_cpus=0)(ProgressTracker).remote()
    task, data_parallel_task = ray.remote(run_task), ray.remote(num_cpus=0)(run_data_parallel_task)
    largest = _largest_node(ray)
    in_flight: dict[Any, Trial] = {}  # ObjectRef -> trial
    groups: dict[Any, Any] = {}  # ObjectRef -> the trial's placement group (trials with actors)
    for trial in trials:
        cpus, gpus = task_resources(trial, threads, largest)
        options = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": max_retries,
                   "name": f"learnbench {trial.describe()}"}
        if trial.data_parallel > 1:  # a Ray Train run of N workers, each with the task's resources
            ref = data_parallel_task.options(name=options["name"], max_retries=max_retries).remote(
                json.dumps(trial.config()), data_dir, cpus, gpus, tracker)
            in_flight[ref] = trial
            continue
        extra, group = placement(ray, trial, cpus, gpus)
        ref = task.options(**options, **extra).remote(json.dumps(trial.config()), data_dir, max(1, math.floor(cpus)),
                                                      tracker)
        in_flight[ref] = trial
        if group is not None:
            groups[ref] = group
    by_id = {t.id: t for t in trials}
    started: set[str] = set()
    try:
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=PROGRESS_INTERVAL_S)
            _relay_progress(_drain(ray, tracker), by_id, started, store, progress)
            for ref in ready:
                trial = in_flight.pop(ref)
                del by_id[trial.id]  # late progress messages of a finished trial are dropped
                if trial.id not in started:  # finished before its start message was relayed
                    _start(trial, started, store, progress)
                result = collect(ray, ref, trial, run_dir)
                if ref in groups:  # its actors are gone with the task: free the reservation
                    ray.util.remove_placement_group(groups.pop(ref))
                store.finish_trial(result)
                progress.finish(trial, result.status, result)
    finally:
        for ref in in_flight:  # interrupted: leave nothing running on the cluster for a dead run
            ray.cancel(ref, force=True)
        for group in groups.values():
            ray.util.remove_placement_group(group)
        ray.kill(tracker)


def _drain(ray, tracker) -> dict[str, float]:
    """The trials' latest fractions; nothing if the tracker died (bars stall, results are still recorded)."""
    try:
        return ray.get(tracker.drain.remote(), timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        return {}


def _relay_progress(updates: dict[str, float], by_id: dict, started: set, store: Store,
                    progress: ProgressView) -> None:
    for trial_id, fraction in updates.items():
        trial = by_id.get(trial_id)
        if trial is None:
            continue
        if trial_id not in started:
            _start(trial, started, store, progress)
        progress.update(trial_id, fraction)


def _start(trial: Trial, started: set, store: Store, progress: ProgressView) -> None:
    started.add(trial.id)
    store.mark_running(trial.id)
    progress.start(trial)


def collect(ray: ModuleType, ref: ray.ObjectRef, trial: Trial, run_dir: str) -> TrialResult:
    """A finished task's result, its weights written into RUN_DIR/models; a task whose worker or node died
    becomes a failed result with Ray's reason."""
    try:
        payload, files = ray.get(ref)
    except ray.exceptions.RayError as exc:
        return TrialResult(trial.id, "failed", failure_reason(exc), {}, (), {"executor": "ray"})
    write_model_files(run_dir, trial.id, files)
    return TrialResult.from_json_dict(json.loads(payload))


def failure_reason(exc: BaseException) -> str:
    kind = type(exc).__name__
    if kind == "WorkerCrashedError":
        head = "Ray worker process died while running the trial (killed, out of memory or crashed)"
    elif kind in ("NodeDiedError", "LocalRayletDiedError"):
        head = "the Ray node running the trial died or was preempted"
    elif kind == "OutOfMemoryError":
        head = "Ray killed the trial's worker for lack of memory"
    elif kind == "TaskCancelledError":
        head = "the trial's Ray task was cancelled"
    else:
        head = "the trial's Ray task failed"
    return f"{head} ({kind}): {str(exc).strip()[:4000]}"


def write_model_files(run_dir: str, trial_id: str, files: dict[str, bytes]) -> None:
    """The weights and description a task sent back, written atomically under their expected names only."""
    expected = {f"{trial_id}.safetensors", f"{trial_id}.json"}
    folder = Path(run_dir) / "models"
    for name, data in files.items():
        if name not in expected:
            raise ValueError(f"a Ray task sent back an unexpected file {name!r}")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)


def run_task(trial_json: str, data_dir: str | None, threads: int,
             tracker: ray.actor.ActorHandle) -> tuple[bytes, dict[str, bytes]]:
    """The Ray task: one trial in a Ray worker, its weights saved to a scratch folder and sent back as bytes."""
    import torch

    from .runner import run_trial

    trial = Trial.from_config(json.loads(trial_json))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only allowed once per process; Ray reuses a worker for many tasks
        pass
    tracker.report.remote(trial.id, 0.0)
    last = [time.monotonic()]

    def report(fraction: float, loss: float | None) -> None:  # the tracker keeps fractions only: no loss in bars
        if time.monotonic() - last[0] > PROGRESS_INTERVAL_S or fraction >= 1.0:
            last[0] = time.monotonic()
            tracker.report.remote(trial.id, fraction)

    with tempfile.TemporaryDirectory(prefix="learnbench-ray-") as scratch:
        result = run_trial(trial, scratch, data_dir, on_progress=report)
        models = Path(scratch) / "models"
        files = {p.name: p.read_bytes() for p in models.iterdir()} if models.is_dir() else {}
    return json.dumps(result.json_dict()).encode(), files


def run_data_parallel_task(trial_json: str, data_dir: str | None, cpus: float, gpus: float,
                           tracker: ray.actor.ActorHandle) -> tuple[bytes, dict[str, bytes]]:
    """The Ray task of a data-parallel trial (it holds no CPU itself): Ray Train's `TorchTrainer` starts
    `trial.data_parallel` workers with `cpus` CPUs (and `gpus` GPUs) each, anywhere in the cluster, and sets up
    their process group (gloo on CPU, NCCL on CUDA); rank 0 runs the trial as the runner does
    (`learnbench.data_parallel`), the others are its helpers. Rank 0 hands its result and weights (base64) to the
    progress tracker actor, which any node reaches (Ray Train keeps reported metrics only with checkpoints on
    shared storage), and they leave here as `run_task`'s do."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trial = Trial.from_config(json.loads(trial_json))
    cuda, per_rank = on_cuda(trial), rank_cpus(trial, cpus)
    with tempfile.TemporaryDirectory(prefix="learnbench-ray-train-") as storage:
        trainer = TorchTrainer(
            _data_parallel_worker,
            train_loop_config={"trial": trial_json, "data_dir": data_dir, "threads": max(1, math.floor(per_rank)),
                               "tracker": tracker},
            scaling_config=ScalingConfig(num_workers=trial.data_parallel, use_gpu=cuda,
                                         resources_per_worker={"CPU": per_rank, **({"GPU": 1} if cuda else {})}),
            torch_config=TorchConfig(backend="nccl" if cuda else "gloo", timeout_s=600),
            run_config=RunConfig(name=f"learnbench-{trial.id}", storage_path=storage,
                                 failure_config=FailureConfig(max_failures=0)))
        trainer.fit()  # raises when a worker failed outside the trial (rank 0 catches the trial's own faults)
    import ray

    delivered = ray.get(tracker.take.remote(trial.id))
    files = {name: base64.b64decode(data) for name, data in delivered["files"].items()}
    return delivered["result"].encode(), files


def _data_parallel_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a data-parallel trial (the process group is up): rank 0 runs the trial and hands
    the result to the tracker, the others step on their shards (`data_parallel.helper_loop`)."""
    import ray.train
    import ray.train.torch
    import torch

    from .data_parallel import helper_loop
    from .runner import run_trial

    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    if rank != 0:
        helper_loop(json.loads(config["trial"]), rank, config["data_dir"], ray.train.torch.get_device())
        return
    trial = Trial.from_config(json.loads(config["trial"]))
    tracker = config["tracker"]
    tracker.report.remote(trial.id, 0.0)
    with tempfile.TemporaryDirectory(prefix="learnbench-ray-") as scratch:
        result = run_trial(trial, scratch, config["data_dir"],
                           on_progress=lambda fraction, loss: tracker.report.remote(trial.id, fraction))
        models = Path(scratch) / "models"
        files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in models.iterdir()} \
            if models.is_dir() else {}
    import ray

    ray.get(tracker.deliver.remote(trial.id, {"result": json.dumps(result.json_dict()), "files": files}))


class ProgressTracker:
    """A Ray actor holding the latest budget fraction of each running trial until the driver drains it."""

    def __init__(self):
        self.latest: dict[str, float] = {}
        self.results: dict[str, dict] = {}  # a data-parallel trial's result, from its rank 0 to its launching task

    def deliver(self, trial_id: str, result: dict) -> None:
        self.results[trial_id] = result

    def take(self, trial_id: str) -> dict:
        return self.results.pop(trial_id)

    def report(self, trial_id: str, fraction: float) -> None:
        self.latest[trial_id] = max(fraction, self.latest.get(trial_id, 0.0))

    def drain(self) -> dict[str, float]:
        latest, self.latest = self.latest, {}
        return latest
