"""One trial, start to finish: the runner owns the loop (AlgoPerf's rule).

    seed -> data on the device -> model -> trainer.setup -> [batch -> trainer.step]* -> evaluation -> attacks

The clock times `trainer.step` alone (CUDA-synchronised at each check, so queued kernels are paid for); evaluation,
diagnostics probes, batch checks and attacks run off the clock. Batches are gathered from the training tensors on
the device with one permutation per epoch: no DataLoader, no host-device copies.

FLOPs are nominal (`learnbench.cost`): the plain model's dense FLOPs per example, counted once per model before
training, times the example-passes each step reports, plus the work the trainer declares outside the model. No
FLOP counter runs during training, so the count neither slows the timed steps nor depends on the code path.

A tuning search configuration (`Trial.is_search`, made by `learnbench tune`) never reads the test split: it is
evaluated on validation only (curve and final `val/` metrics; no `test/` point, no attack), and its weights are not
kept (only the tuned reruns' are); see `_held_out`.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import artifacts, cost, machine, models, population_backend
from .data_parallel import DataParallelTrainer
from .registry import discover
from .spec import Batch, StepStats, TaskInfo
from .trial import Budget, CurvePoint, Trial, TrialResult

BATCH_CHECK_EVERY = 100  # the batch is compared with a copy after step 0, 1 and every BATCH_CHECK_EVERY-th
_DATA_CACHE: dict[tuple, Any] = {}  # per process: (dataset, data_dir, device) -> Splits on the device
_FLOPS_CACHE: dict[str, cost.ModelFlops] = {}  # per process: model spec and shapes -> FLOPs per example
METRIC_NAME = re.compile(r"[a-z0-9_-]+(/[a-z0-9_-]+)*")  # a trainer's own metric: `sigma`, `fitness/min`
RESERVED_METRICS = ("loss",)  # train/loss is the runner's mean of the reported losses


class Sampler:
    """Index sampling from on-device tensors: one permutation per epoch, then one `index_select` per step into a
    fresh contiguous batch. Measured on this CPU for MNIST at batch 128: 8 ms of gathers per epoch, against 60 ms
    for permuting the whole 172 MB training set once per epoch (which streams it through DRAM twice). A fresh
    batch also means a trainer that writes into its batch cannot corrupt the training set. The last partial batch
    of an epoch is dropped so every step sees `batch_size` examples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator):
        if batch_size > x.shape[0]:
            raise ValueError(f"batch_size {batch_size} exceeds the training set ({x.shape[0]} examples)")
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator
        self.per_epoch = x.shape[0] // batch_size
        self.position = self.per_epoch  # forces a permutation on the first call

    def next(self) -> Batch:
        if self.position == self.per_epoch:
            self.order = torch.randperm(self.x.shape[0], generator=self.generator, device=self.x.device)
            self.position = 0
        start = self.position * self.batch_size
        self.position += 1
        index = self.order[start:start + self.batch_size]  # [B]
        return Batch(self.x.index_select(0, index), self.y.index_select(0, index))


@dataclass
class Progress:
    """Counters of one trial; `fraction` is how much of the budget is spent (the largest of its criteria)."""

    budget: Budget
    n_train: int
    model_flops: cost.ModelFlops
    steps: int = 0
    examples: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    extra_flops: float = 0.0
    train_seconds: float = 0.0
    metrics: Mapping[str, Any] = field(default_factory=dict)
    """The latest step's `StepStats.metrics`, unread (tensors stay on the device) until an evaluation point."""
    metric_names: frozenset[str] = frozenset()  # the names last validated (`_trainer_metrics`)

    @property
    def flops(self) -> float:
        """Nominal FLOPs so far: dense model FLOPs per example-pass plus the declared work outside the model."""
        return (self.model_flops.forward * self.forward_passes + self.model_flops.backward * self.backward_passes
                + self.extra_flops)

    def add(self, stats: StepStats, examples: int) -> None:
        self.steps += 1
        self.examples += examples
        self.forward_passes += int(stats.forward_passes)
        self.backward_passes += int(stats.backward_passes)
        self.extra_flops += float(stats.extra_flops)
        self.metrics = stats.metrics  # a reference: read only at the next evaluation point

    @property
    def fraction(self) -> float:
        b, parts = self.budget, [0.0]
        if b.steps:
            parts.append(self.steps / b.steps)
        if b.epochs:
            parts.append(self.examples / (b.epochs * self.n_train))
        if b.time_s:
            parts.append(self.train_seconds / b.time_s)
        if b.flops:
            parts.append(self.flops / b.flops)
        return max(parts)

    def point(self, metric: str, value: float) -> CurvePoint:
        return CurvePoint(self.steps, self.examples, self.flops, self.train_seconds, metric, float(value))


class Diverged(Exception):
    pass


class BatchMutated(RuntimeError):
    """A trainer wrote into (or replaced a tensor of) the batch it was given: the trial fails."""


class _BatchWatch:
    """A copy of one batch taken before `step` (off the clock) and compared after it. Batches are fresh gathers,
    so a writing trainer cannot corrupt the training set; it could still corrupt what probes see after the step."""

    def __init__(self, batch: Batch):
        self.batch, self.x, self.y = batch, batch.x, batch.y
        self.x_copy, self.y_copy = batch.x.clone(), batch.y.clone()

    def verify(self, trainer, step: int) -> None:
        changed = [name for name, now, seen, copy in (("x", self.batch.x, self.x, self.x_copy),
                                                      ("y", self.batch.y, self.y, self.y_copy))
                   if now is not seen or not torch.equal(seen, copy)]
        if changed:
            fields = ", ".join(f"batch.{name}" for name in changed)
            raise BatchMutated(f"{type(trainer).__name__}.step modified its batch ({fields}) at step {step}; "
                               "a trainer must not write into the batch it is given (clone it first)")


def run_trial(trial: Trial, run_dir: str | None, data_dir: str | None = None,
              on_progress: Callable[[float, float | None], None] | None = None) -> TrialResult:
    """Run one resolved trial in this process; never raises for a trainer's fault. Returns a JSON-able result:
    its status, error, final metrics, curves and provenance; weights go to RUN_DIR/models/ (if run_dir).
    `on_progress(fraction, train_loss)` is called at every evaluation point: the budget fraction used and the mean
    training loss since the previous point (None at the first)."""
    device = torch.device(trial.device)
    curves: list[CurvePoint] = []
    metrics: dict[str, float] = {}
    status, error = "done", None
    machine.reset_peak_memory(device)
    try:
        splits, entry, model, task = prepare(trial, data_dir, device)
        progress = Progress(trial.budget, task.n_train, _model_flops(trial, model, task))
        # where population methods evaluate members (a run resource), and the helper processes of a data-parallel
        # trial (learnbench.data_parallel)
        with _population_backend(trial, task), _process_group(trial, data_dir, device):
            trainer = _construct(entry.cls, trial.hparams)
            if trial.data_parallel > 1:
                trainer = DataParallelTrainer(trainer, trial.data_parallel, rank=0)
            trainer.setup(model, task, _generator(trial.seed, 0, device))
            sampler = Sampler(splits.train_x, splits.train_y, trial.hparams["batch_size"],
                              _generator(trial.seed, 1, device))
            probes = _probes(trial, model, trainer, task)
            try:
                _train(trainer, sampler, progress, trial, splits, curves, probes, on_progress)
            except Diverged as exc:
                status, error = "diverged", str(exc)
            if trial.data_parallel > 1:
                trainer.stop()  # the helpers leave; evaluation and attacks below run in this process alone
            for split, x, y in _held_out(trial, splits):
                loss, accuracy = _evaluate(_eval_model(trainer), x, y, trial.eval.batch_size)
                metrics.update({f"{split}/accuracy": accuracy, f"{split}/loss": loss})
        metrics.update(_cost_metrics(progress, device))
        if trial.data_parallel > 1:
            metrics["cost/processes"] = float(trial.data_parallel)
        metrics.update(_last_values(curves, ("train/", "align/", "grad/", "update/", "cos/", "flag/")))
        if status == "done" and not trial.is_search:  # attacks use test points
            metrics.update(_robustness(trial, _eval_model(trainer), _pseudo_gradient_model(trainer, model), splits,
                                       device))
        if run_dir and not trial.is_search:
            artifacts.save_model(run_dir, trial, _eval_model(trainer), splits.input_shape, splits.n_classes)
    except Exception:  # the trainer's (or a plugin's) fault: this trial fails, the suite goes on
        status, error = "failed", traceback.format_exc(limit=20)
    return TrialResult(trial.id, status, error, metrics, tuple(curves), artifacts.provenance(trial, device))


def prepare(trial: Trial, data_dir: str | None, device: torch.device) -> tuple[Any, Any, nn.Module, TaskInfo]:
    """What every process of a trial builds alike before training: its data on `device`, its registry entry, its
    model initialised from the trial's seed, and the task the trainer is told (`learnbench.data_parallel`'s
    helpers build the same)."""
    splits = _data(trial.dataset, data_dir, device)
    entry = discover([trial.plugin["file"]] if trial.plugin.get("file") else []).get(trial.algorithm)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(trial.seed)  # model initialisation only; trainers get their own generator
        model = models.build(trial.model, splits.input_shape, splits.n_classes).to(device)
    task = TaskInfo(tuple(splits.input_shape), splits.n_classes, int(splits.train_x.shape[0]), device)
    return splits, entry, model, task


@contextlib.contextmanager
def _population_backend(trial: Trial, task: TaskInfo) -> Iterator[None]:
    """`learnbench.population`'s evaluation backend for the block (`population_backend.evaluated_by`):
    `resources.actors` Ray actors (`population_ray.ActorBackend`, given the trial's model spec) that evaluate every
    population the trial's trainer asks for, killed on exit, error or not; 0 or absent: none (population methods
    compute in this process)."""
    actors = int(trial.resources.get("actors") or 0)
    if not actors:
        yield
        return
    from .population_ray import ActorBackend  # Ray is imported only by trials that use it

    with ActorBackend(actors, trial.model, task) as backend, population_backend.evaluated_by(backend):
        yield


@contextlib.contextmanager
def _process_group(trial: Trial, data_dir: str | None, device: torch.device) -> Iterator[None]:
    """For a data-parallel trial, its N - 1 helper processes and the process group (`data_parallel.local_group`),
    unless one is already up (Ray Train's workers: `executor_ray.run_data_parallel_task`); nothing for one
    process."""
    if trial.data_parallel <= 1 or torch.distributed.is_initialized():
        yield
        return
    from .data_parallel import local_group

    with local_group(trial.config(), data_dir, device):
        yield


def _construct(cls: type, hparams: dict[str, Any]):
    """The trainer built from the recorded hyper-parameters; a constructor that rejects them fails the trial."""
    try:
        return cls(**hparams)
    except Exception as exc:
        raise RuntimeError(f"{cls.__name__}(**hparams) rejected the recorded hyper-parameters {hparams}: "
                           f"{type(exc).__name__}: {exc}") from exc


def _eval_model(trainer) -> nn.Module:
    model = trainer.eval_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{type(trainer).__name__}.eval_model returned {type(model).__name__}, not torch.nn.Module")
    return model


def _train(trainer, sampler: Sampler, progress: Progress, trial: Trial, splits, curves: list[CurvePoint], probes: list,
           on_progress) -> None:
    """The training loop. Evaluation points are where the budget fraction crosses k/points (and at 0)."""
    device = splits.train_x.device
    n_points = trial.eval.points  # 0: no curves, only the final evaluation
    next_eval, losses = 0.0 if n_points else math.inf, []
    every = trial.diagnostics.every if probes else 0
    while True:
        if n_points and (progress.fraction >= next_eval or progress.fraction >= 1.0):
            _record_eval(trainer, splits, trial, progress, curves, losses)
            next_eval = (math.floor(progress.fraction * n_points) + 1) / n_points
            if on_progress:  # the train/loss point just recorded (none before the first step) for progress bars
                loss = next((p.value for p in reversed(curves) if p.metric == "train/loss"), None) if losses else None
                on_progress(min(1.0, progress.fraction), loss)
            losses = []
        if progress.fraction >= 1.0:
            return
        if every and progress.steps % every == 0:
            batch = sampler.next()
            for probe in probes:
                probe.before_step(batch)
            losses += _timed_steps(trainer, [batch], progress, device, check_batch=True)  # probes read it after
            values: dict[str, float] = {}
            for probe in probes:
                values.update(probe.after_step(batch))
            curves.extend(progress.point(k, v) for k, v in values.items())
        else:
            n = _chunk(progress, next_eval, every, device)
            losses += _timed_steps(trainer, [sampler.next() for _ in range(n)], progress, device)


def _chunk(progress: Progress, next_eval: float, every: int, device: torch.device) -> int:
    """Steps to run between clock reads. On CPU one (reading the clock is free); on CUDA up to 8, so the host does
    not wait for the GPU after every step, cut short before a batch check, a probe or a step/epoch limit."""
    if device.type != "cuda":
        return 1
    step = progress.steps
    if step <= 1:
        return 1
    n = min(8, BATCH_CHECK_EVERY - step % BATCH_CHECK_EVERY)  # a checked step opens its chunk
    if every:
        n = min(n, every - step % every)
    budget, batch = progress.budget, max(1, progress.examples // max(1, step))
    for limit in (budget.steps, budget.epochs and budget.epochs * progress.n_train / batch):
        if limit:
            n = min(n, max(1, math.ceil(min(next_eval, 1.0) * limit) - step))
    return max(1, n)


def _timed_steps(trainer, batches: list[Batch], progress: Progress, device: torch.device,
                 check_batch: bool = False) -> list:
    """`trainer.step` on each batch, on the clock (synchronised at both ends); the first batch is compared with a
    copy, taken off the clock, when its step is a checked one (0, 1, every BATCH_CHECK_EVERY-th, or a probe step).
    Counting passes and FLOPs happens after the clock stops. Raises Diverged on a non-finite loss and BatchMutated
    when the trainer wrote into its batch."""
    checked = progress.steps <= 1 or progress.steps % BATCH_CHECK_EVERY == 0 or check_batch
    watch = _BatchWatch(batches[0]) if checked else None
    results = []
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        results.append(trainer.step(batch))
    _sync(device)  # a CUDA step is not over until its kernels are
    progress.train_seconds += time.perf_counter() - start
    if watch is not None:
        watch.verify(trainer, progress.steps)
    for stats, batch in zip(results, batches):
        if not isinstance(stats, StepStats):
            raise TypeError(f"{type(trainer).__name__}.step returned {type(stats).__name__}, not StepStats")
        progress.add(stats, int(batch.y.shape[0]))
    losses = [stats.loss for stats in results]
    _check_finite(losses, progress.steps)
    return losses


def _check_finite(losses: list, step: int) -> None:
    if len(losses) == 1:
        finite = math.isfinite(float(losses[0]))
    else:  # one host read per chunk, after the synchronisation above
        finite = bool(torch.isfinite(torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in losses])).all())
    if not finite:
        raise Diverged(f"non-finite training loss at step {step}")


def _held_out(trial: Trial, splits) -> tuple[tuple[str, torch.Tensor, torch.Tensor], ...]:
    """The splits a trial is evaluated on: validation, and test unless the trial is a tuning search configuration,
    which is scored on validation alone and must never read the test split."""
    val = ("val", splits.val_x, splits.val_y)
    return (val,) if trial.is_search else (val, ("test", splits.test_x, splits.test_y))


def _record_eval(trainer, splits, trial: Trial, progress: Progress, curves: list[CurvePoint], losses: list) -> None:
    model = _eval_model(trainer)
    for split, x, y in _held_out(trial, splits):
        loss, accuracy = _evaluate(model, x, y, trial.eval.batch_size)
        curves += [progress.point(f"{split}/accuracy", accuracy), progress.point(f"{split}/loss", loss)]
    if losses:
        mean = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in losses]).mean()
        curves.append(progress.point("train/loss", float(mean)))
    curves += [progress.point(f"train/{name}", value) for name, value in _trainer_metrics(trainer, progress).items()]


def _trainer_metrics(trainer, progress: Progress) -> dict[str, float]:
    """The latest step's own values (`StepStats.metrics`) as floats: read here, at an evaluation point, the only
    host sync they cost. Names are validated when their set first appears or changes."""
    values = progress.metrics
    if not isinstance(values, Mapping):
        raise TypeError(f"{type(trainer).__name__}.step returned StepStats.metrics of type "
                        f"{type(values).__name__}, not a dict of name -> float")
    names = frozenset(values)
    if names != progress.metric_names:
        bad = [name for name in sorted(names, key=str) if metric_name_problem(name)]
        if bad:
            raise ValueError(f"{type(trainer).__name__}.step reported metric name(s) {bad}: "
                             f"{metric_name_problem(bad[0])}")
        progress.metric_names = names
    try:
        return {name: float(value) for name, value in values.items()}
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a tensor of several elements
        raise TypeError(f"{type(trainer).__name__}.step's metrics must be floats or 0-d tensors: {exc}") from None


def metric_name_problem(name: Any) -> str | None:
    """What is wrong with a trainer's metric name (`StepStats.metrics`), or None."""
    if not isinstance(name, str) or not METRIC_NAME.fullmatch(name):
        return (f"{name!r} is not lowercase segments of [a-z0-9_-] joined by '/' (it is recorded as "
                "train/<name>)")
    if name in RESERVED_METRICS:
        return f"{name!r} is reserved (train/{name} is the runner's)"
    return None


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode; the module's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    loss, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start:start + batch_size])  # [b, C]
        target = y[start:start + batch_size]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != target.shape[0]:
            raise TypeError(f"the evaluated model returned {_describe_output(logits)} for {target.shape[0]} inputs; "
                            "expected [B, n_classes] logits")
        loss += F.cross_entropy(logits.float(), target, reduction="sum")
        correct += (logits.argmax(1) == target).sum()
    model.train(was_training)
    return float(loss) / x.shape[0], float(correct) / x.shape[0]


def _describe_output(value: Any) -> str:
    return f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _pseudo_gradient_model(trainer, model: nn.Module) -> nn.Module:
    """The module whose input gradient is the rule's own, for the pseudo-gradient attacks: the trainer's
    `pseudo_gradient_model()` when it has one (PEPITA's error projection), else the training model (the FA
    family's feedback layers; attacks/robustness.py uses it only when it has them)."""
    own = getattr(trainer, "pseudo_gradient_model", None)
    return own() if callable(own) else model


def _robustness(trial: Trial, model: nn.Module, training_model: nn.Module, splits, device) -> dict[str, float]:
    settings = trial.robustness
    if not settings.get("examples"):
        return {}
    from .attacks.robustness import evaluate

    n = min(settings["examples"], splits.test_x.shape[0])
    return evaluate(model, splits.test_x[:n], splits.test_y[:n], settings,
                    generator=_generator(trial.seed, 2, device), training_model=training_model)


def _probes(trial: Trial, model: nn.Module, trainer, task: TaskInfo) -> list:
    names = trial.diagnostics.probes
    if not names or not trial.diagnostics.every:
        return []
    from .diagnostics import get_probe

    return [get_probe(name)(model, trainer, task) for name in names]


def _cost_metrics(progress: Progress, device: torch.device) -> dict[str, float]:
    return {"cost/train_seconds": progress.train_seconds, "cost/flops": progress.flops,
            "cost/extra_flops": progress.extra_flops, "cost/model_forward_flops": progress.model_flops.forward,
            "cost/model_backward_flops": progress.model_flops.backward,
            "cost/examples": progress.examples, "cost/steps": progress.steps,
            "cost/epochs": progress.examples / progress.n_train,
            "cost/forward_passes": progress.forward_passes, "cost/backward_passes": progress.backward_passes,
            "cost/peak_memory_bytes": machine.peak_memory(device), "cost/threads": torch.get_num_threads()}


def _model_flops(trial: Trial, model: nn.Module, task: TaskInfo) -> cost.ModelFlops:
    """The plain model's FLOPs per example (`learnbench.cost`), counted once per model spec in this process, before
    the trainer sees the model. A FLOP budget on a model the counter sees no work in would never end: refused."""
    key = json.dumps([trial.model, task.input_shape, task.n_classes], sort_keys=True, default=str)
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = cost.model_flops(model, task.input_shape)
    flops = _FLOPS_CACHE[key]
    if trial.budget.flops and flops.forward <= 0:
        raise ValueError("budget.flops needs a model whose forward pass FlopCounterMode can count (matrix products "
                         "or convolutions); this one counts 0 FLOPs: use a steps, epochs or time_s budget")
    return flops


def _last_values(curves: list[CurvePoint], prefixes: tuple[str, ...]) -> dict[str, float]:
    return {point.metric: point.value for point in curves if point.metric.startswith(prefixes)}


def _data(name: str, data_dir: str | None, device: torch.device):
    key = (name, data_dir, str(device))
    if key not in _DATA_CACHE:
        from .datasets import load

        _DATA_CACHE[key] = load(name, data_dir).to(device)
    return _DATA_CACHE[key]


def _generator(seed: int, stream: int, device: torch.device) -> torch.Generator:
    """Independent streams per trial: 0 the trainer's, 1 batch order, 2 attacks."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + stream * 7_919 + 12_345)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
