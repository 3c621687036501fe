"""The conformance kit: does a trainer class keep the Trainer contract? Tiny data, a few seconds per trainer.

    learnbench check-plugin NAME|FILE.py            # one line per check: PASS/FAIL and the reason
    from learnbench.testing import check_trainer    # check_trainer(cls) -> list[CheckResult]

    from learnbench.testing import parametrize_with_checks
    @parametrize_with_checks([MyTrainer])           # one pytest test per check, as scikit-learn's helper does
    def test_conformance(trainer, check):
        check(trainer)

The checks (`CHECKS`, in order) are independent: one failing never hides another. They run the trainer with its
default hyper-parameters on scikit-learn's 8x8 digits (1,797 images [1, 8, 8], pixels / 16, loaded directly, so
the kit needs no dataset file) with the MLP 64-32-10 of `learnbench.models`, batches drawn by the runner's own
`Sampler`, for `KIT_STEPS` steps; `trial_recorded` runs a one-trial suite through `learnbench.runner.run_trial` and
`learnbench.store.Store` in a temporary folder. The kit knows no trainer by name (unlike scikit-learn's checks).
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn.functional as F

from . import registry, search_space
from .config import ENTRY_KEYS
from .conformance import (KIT_MODEL, KIT_SEED, KIT_STEPS, CheckFailed, Context, describe, failing, plain, shape_of,
                          single_thread)
from .spec import StepStats
from .trial import CurvePoint, StoredTrial, Trial

if TYPE_CHECKING:  # pytest is a test dependency, imported where the decorator is built
    import pytest

SUITE_KEYS = ENTRY_KEYS  # keys of a suite's [[algorithms]] entry: not hyper-parameters

__all__ = ["CHECKS", "CheckFailed", "CheckResult", "check_trainer", "parametrize_with_checks"]


@dataclass
class CheckResult:
    """The outcome of one check: `reason` says what was measured (pass) or what is wrong (fail)."""

    name: str
    passed: bool
    reason: str
    seconds: float = 0.0

    def line(self) -> str:
        reason = " ".join(self.reason.split())  # one line, whatever the exception message looked like
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<22} {reason}"


# --- the checks: each returns what it measured, or raises CheckFailed with the reason -------------------------------

def check_constructible(ctx: Context) -> str:
    """`cls()` works with the defaults alone; the class has a name and a positive integer `batch_size`."""
    defaults = registry.hparam_defaults(ctx.cls)
    required = [k for k, v in defaults.items() if v is inspect.Parameter.empty]
    if required:
        raise CheckFailed(f"hyper-parameter(s) without a default: {', '.join(required)}")
    if not ctx.cls.name or not ctx.cls.name.strip() or ctx.cls.name != ctx.cls.name.strip():
        raise CheckFailed(f"name must be a non-empty id without surrounding spaces; got {ctx.cls.name!r}")
    with failing("__init__ with the defaults"):
        ctx.cls()
    batch = defaults.get("batch_size")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise CheckFailed(f"needs a batch_size hyper-parameter with a positive int default; got {batch!r}")
    ctx.hparams()  # notes the kit's adjustments, if any
    notes = f"; the kit uses {', '.join(ctx.notes)}" if ctx.notes else ""
    return f"{ctx.cls.__name__}() with {len(defaults)} default hyper-parameter(s), batch_size {batch}{notes}"


def check_unique_name(ctx: Context) -> str:
    """No other installed trainer (or built-in) claims the same name."""
    try:
        installed = registry.discover()
    except Exception as exc:  # UsageError: two *other* installed plugins clash
        raise CheckFailed(f"the installed plugins do not load together: {exc}") from None
    other = installed.entries.get(ctx.cls.name)
    if other is not None and other.cls is not ctx.cls:
        raise CheckFailed(f"the name {ctx.cls.name!r} is already taken by {other.distribution} "
                          f"({other.extra.get('target') or other.source}); pick another `name`")
    return f"{ctx.cls.name!r} is not claimed by any other installed trainer ({len(installed.entries)} installed)"


def check_hparams_round_trip(ctx: Context) -> str:
    """Defaults -> resolve_hparams (their type hints checked) -> JSON (the trial config) -> cls(**...) -> the
    same values (scikit-learn's clone check)."""
    with failing("__init__ with the defaults"):
        original = plain(registry.hparams_of(ctx.cls()))
    declared = plain(registry.hparam_defaults(ctx.cls))
    altered = {k: (declared[k], original[k]) for k in declared if original.get(k) != declared[k]}
    if altered:
        raise CheckFailed(f"__init__ changed default(s) (declared, stored): {altered}; store them as given and "
                          "resolve them in setup")
    clash = sorted(set(original) & SUITE_KEYS)
    if clash:
        raise CheckFailed(f"hyper-parameter name(s) {clash} clash with suite entry keys {sorted(SUITE_KEYS)}")
    try:
        resolved = registry.resolve_hparams(ctx.cls, dict(original), "the defaults")
        stored = json.loads(json.dumps(resolved))
    except (TypeError, ValueError) as exc:
        raise CheckFailed(f"defaults do not survive the JSON trial config: {exc}") from None
    except Exception as exc:  # UsageError: a default that contradicts its own type hint
        raise CheckFailed(str(exc)) from None
    with failing("__init__ with the recorded hyper-parameters"):
        rebuilt = plain(registry.hparams_of(ctx.cls(**stored)))
    changed = {k: (stored[k], rebuilt[k]) for k in stored if rebuilt[k] != stored[k]}
    if changed or plain(resolved) != original:
        raise CheckFailed(f"values changed on the way through the config (given, stored): {changed or resolved}")
    return f"{len(stored)} hyper-parameter(s) survive resolve_hparams, JSON and the constructor unchanged"


def check_search_space(ctx: Context) -> str:
    """An optional `search_space` (learnbench.search_space) names only hyper-parameters with well-formed dimensions,
    and every corner (the kit's defaults updated with each dimension's extremes, all combinations) passes the type
    hints, the constructor and `validate()`: the extremes a tuner may draw are values the trainer accepts."""
    space = getattr(ctx.cls, "search_space", None)
    if isinstance(space, Mapping):  # the space for the kit's defaults (a class may adjust it to them)
        space = search_space.space_for(ctx.cls, registry.hparam_defaults(ctx.cls))
    if space is None:
        return "no search_space declared (optional)"
    if not isinstance(space, Mapping):
        raise CheckFailed(f"search_space must be a dict of hyper-parameter name -> LogUniform, Uniform, IntRange or "
                          f"Choice; got {type(space).__name__}")
    try:
        search_space.check(space, registry.hparam_defaults(ctx.cls), ctx.cls.name)
    except ValueError as exc:
        raise CheckFailed(str(exc)) from None
    with failing("resolving the default hyper-parameters"):
        base = ctx.hparams()
    corners = list(search_space.corners(space))
    failed = [(corner, problem) for corner in corners if (problem := ctx.corner_problem(corner, base))]
    if failed:
        corner, problem = failed[0]
        raise CheckFailed(f"{len(failed)} of {len(corners)} corner(s) of the search space fail; the first, {corner}: "
                          f"{problem}")
    dims = ", ".join(f"{name} {type(dim).__name__}" for name, dim in space.items())
    checked = "validate()" if callable(getattr(ctx.cls, "validate", None)) else "the constructor (no validate())"
    return f"{len(space)} dimension(s) ({dims}); all {len(corners)} corner(s) pass the type hints and {checked}"


def check_init_stores_only(ctx: Context) -> str:
    """__init__ sets the hyper-parameters and nothing else; setup and steps leave them unchanged."""
    with failing("__init__ with the defaults"):
        trainer = ctx.cls()
    extra = sorted(set(getattr(trainer, "__dict__", {})) - set(registry.hparam_defaults(ctx.cls)))
    if extra:
        raise CheckFailed(f"__init__ set attributes beyond the hyper-parameters: {', '.join(extra)} "
                          "(build state in setup)")
    run = ctx.run(0).require()
    changed = sorted(k for k in run.hparams_before if run.hparams_before[k] != run.hparams_after.get(k))
    if changed:
        raise CheckFailed("setup/step changed hyper-parameter(s) " + ", ".join(
            f"{k}: {run.hparams_before[k]!r} -> {run.hparams_after.get(k)!r}" for k in changed))
    return f"only hyper-parameters after __init__; unchanged after setup and {KIT_STEPS} steps"


def check_runs(ctx: Context) -> str:
    """__init__ with the defaults, setup and `KIT_STEPS` steps run without raising."""
    run = ctx.run(0)
    if run.error:
        raise CheckFailed(run.error)
    return f"__init__, setup and {KIT_STEPS} steps in {run.seconds:.2f} s"


def check_deterministic(ctx: Context) -> str:
    """Two runs with the same seed give the same losses and the same final weights."""
    a, b = ctx.run(0).require(), ctx.run(1).require()
    exact = ctx.device.type == "cpu"
    same = (lambda u, v: u == v or (math.isnan(u) and math.isnan(v))) if exact else \
        (lambda u, v: math.isclose(u, v, rel_tol=1e-4, abs_tol=1e-6))
    for step, (u, v) in enumerate(zip(a.losses, b.losses)):
        if not same(u, v):
            raise CheckFailed(f"same seed, different loss at step {step}: {u!r} vs {v!r}")
    for key, tensor in a.state.items():
        other = b.state.get(key)
        equal = other is not None and other.shape == tensor.shape and (
            torch.equal(tensor, other) if exact else torch.allclose(tensor, other, rtol=1e-4, atol=1e-6))
        if not equal:
            raise CheckFailed(f"same seed, different final weights in {key!r}")
    kind = "bit-identical" if exact else "equal within 1e-4"
    what = "losses" if a.eval_error else "losses and final weights"  # no weights without a usable eval_model()
    return f"2 runs of {KIT_STEPS} steps, seed {KIT_SEED}: {what} {kind}"


def check_uses_given_generator(ctx: Context) -> str:
    """Construction, setup and steps draw no number from torch's global generator (only from the one given)."""
    run = ctx.run(0).require()
    if run.global_rng_used:
        raise CheckFailed(f"{' and '.join(run.global_rng_used)} global generator state changed: draw from the "
                          "torch.Generator passed to setup (torch.randn(..., generator=g))")
    return "torch's global generator untouched by __init__, setup, steps and eval_model"


def check_loss_decreases(ctx: Context) -> str:
    """Every reported loss is finite; the mean of the last quarter of steps is below that of the first quarter;
    eval_model()'s loss on all kit data is lower after the steps than before (no minibatch noise in that one)."""
    run = ctx.run(0).require()
    bad = [i for i, v in enumerate(run.losses) if not math.isfinite(v)]
    if bad:
        raise CheckFailed(f"non-finite or non-numeric loss at step(s) {bad[:5]}: {run.losses[bad[0]]!r}")
    k = max(1, KIT_STEPS // 4)
    first, last = sum(run.losses[:k]) / k, sum(run.losses[-k:]) / k
    if not last < first:
        raise CheckFailed(f"reported loss did not decrease: mean of steps 0-{k - 1} {first:.4f}, "
                          f"of the last {k} {last:.4f}")
    reported = f"step loss {first:.3f} -> {last:.3f} (first/last {k} steps)"
    if run.eval_error:
        return f"{reported}; eval_model() unusable (see eval_model), its loss not compared"
    if not run.loss_after < run.loss_before:
        raise CheckFailed(f"eval_model() did not improve on the kit data: loss {run.loss_before:.4f} before, "
                          f"{run.loss_after:.4f} after {KIT_STEPS} steps")
    return (f"{reported}; eval_model() loss on all {ctx.task.n_train} examples {run.loss_before:.3f} -> "
            f"{run.loss_after:.3f}")


def check_batch_not_mutated(ctx: Context) -> str:
    """`step` neither writes into batch.x / batch.y nor replaces them (compared with copies after every step)."""
    run = ctx.run(0).require()
    if run.mutated:
        raise CheckFailed(f"step modified its batch: {'; '.join(run.mutated[:3])} (clone before writing)")
    return f"batch.x and batch.y unchanged after each of {KIT_STEPS} steps"


def check_step_stats_plausible(ctx: Context) -> str:
    """step returns StepStats: a scalar loss, int forward_passes >= the batch size, int backward_passes >= 0."""
    run = ctx.run(0).require()
    for step, (stats, size) in enumerate(zip(run.stats, run.batch_sizes)):
        problem = _stats_problem(stats, size)
        if problem:
            raise CheckFailed(f"step {step}: {problem}")
    fwd, bwd = run.stats[0].forward_passes, run.stats[0].backward_passes
    return f"StepStats each step; step 0: {fwd} forward, {bwd} backward example-passes for batch {run.batch_sizes[0]}"


def _stats_problem(stats: Any, batch: int) -> str | None:
    if not isinstance(stats, StepStats):
        return f"returned {type(stats).__name__}, not StepStats"
    if isinstance(stats.loss, torch.Tensor) and stats.loss.numel() != 1:
        return f"loss is a tensor of shape {list(stats.loss.shape)}, not a scalar"
    if not isinstance(stats.loss, (numbers.Real, torch.Tensor)) or isinstance(stats.loss, bool):
        return f"loss is {type(stats.loss).__name__}, not a float or 0-d tensor"
    for name, low in (("forward_passes", batch), ("backward_passes", 0)):
        value = getattr(stats, name)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            return f"{name} is {type(value).__name__} {value!r}, not an int"
        if value < low:
            return f"{name} = {value} < {low}" + (" (the batch size)" if low else "")
    return None


def check_step_metrics(ctx: Context) -> str:
    """The optional `StepStats.metrics`: a dict of valid names (lowercase `[a-z0-9_-]` segments joined by `/`, not
    `loss`) to finite floats or 0-d tensors, with the same names at every step (each is a `train/<name>` curve)."""
    from .runner import metric_name_problem

    run = ctx.run(0).require()
    names = None
    for step, stats in enumerate(run.stats):
        metrics = getattr(stats, "metrics", {})
        if not isinstance(metrics, Mapping):
            raise CheckFailed(f"step {step}: metrics is {type(metrics).__name__}, not a dict of name -> float")
        if names is None:
            names = set(metrics)
            bad = [name for name in sorted(names, key=str) if metric_name_problem(name)]
            if bad:
                raise CheckFailed(f"step {step}: {metric_name_problem(bad[0])}")
        elif set(metrics) != names:
            raise CheckFailed(f"step {step} reported metrics {sorted(metrics, key=str)}, step 0 "
                              f"{sorted(names, key=str)}: report the same names every step")
        for name, value in metrics.items():
            problem = _metric_value_problem(value)
            if problem:
                raise CheckFailed(f"step {step}: metric {name!r} {problem}")
    if not names:
        return "no metrics reported (optional)"
    return f"{len(names)} metric(s), the same at each of {len(run.stats)} steps, finite: {', '.join(sorted(names))}"


def _metric_value_problem(value: Any) -> str | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return f"is a tensor of shape {list(value.shape)} and dtype {value.dtype}, not a real 0-d tensor"
        value = float(value)
    elif not isinstance(value, numbers.Real) or isinstance(value, bool):
        return f"is {type(value).__name__} {value!r}, not a float or 0-d tensor"
    return None if math.isfinite(float(value)) else f"is {float(value)}, not finite"


def check_eval_model(ctx: Context) -> str:
    """eval_model() is an nn.Module of the model's architecture (its weights reload into the model spec) giving
    finite [B, n_classes] logits, with a finite gradient with respect to the input (the attacks need it)."""
    run = ctx.run(0).require()
    if run.eval_error:
        raise CheckFailed(run.eval_error)
    fresh = ctx.build_model().state_dict()
    ours = run.model.state_dict()
    missing, unexpected = sorted(set(fresh) - set(ours)), sorted(set(ours) - set(fresh))
    wrong = sorted(k for k in set(fresh) & set(ours) if fresh[k].shape != ours[k].shape)
    if missing or unexpected or wrong:
        raise CheckFailed(f"state dict differs from the model's (saved weights would not reload): missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}, other shape {wrong[:3]}")
    x = ctx.x[:64].clone().requires_grad_(True)
    was_training = run.model.training
    run.model.eval()
    with failing("the eval_model() forward/backward"):
        logits = run.model(x)  # [64, C]
        if isinstance(logits, torch.Tensor) and logits.shape == (64, ctx.task.n_classes):
            F.cross_entropy(logits.float(), ctx.y[:64]).backward()
    run.model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.shape != (64, ctx.task.n_classes):
        raise CheckFailed(f"gave {shape_of(logits)} for 64 inputs; expected [64, {ctx.task.n_classes}] logits")
    if not logits.is_floating_point() or not torch.isfinite(logits).all():
        raise CheckFailed(f"logits are not finite floats (dtype {logits.dtype})")
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise CheckFailed("no finite gradient with respect to the input (attacks need the true input gradient)")
    return f"{type(run.model).__name__}: [64, {ctx.task.n_classes}] finite logits, input gradient, weights reload"


def check_trial_recorded(ctx: Context) -> str:
    """A one-trial suite runs through the runner and the store: status done, hyper-parameters, provenance and
    metrics read back, and the saved weights reload to the recorded test accuracy."""
    from .artifacts import load_model
    from .datasets import load

    with tempfile.TemporaryDirectory() as tmp:
        trial, row, curves = _run_and_read_back(ctx, tmp)
        if row.status != "done":
            last_line = (row.error or "").strip().splitlines()[-1:] or ["no error recorded"]
            raise CheckFailed(f"trial {row.status}: {last_line[0]}")
        problems = _record_problems(row, trial, ctx.entry, curves)
        if problems:
            raise CheckFailed("; ".join(problems))
        test = load("digits")
        # registered: a trainer whose evaluation module wraps the model is found by name to rebuild it
        with torch.no_grad(), registry.registered(ctx.entry), \
                failing("reloading the saved weights into the model spec"):
            logits = load_model(tmp, trial.id, ctx.device)(test.test_x.to(ctx.device))  # [n_test, C]
        accuracy = float((logits.argmax(1).cpu() == test.test_y).sum()) / test.test_y.shape[0]
    if not math.isclose(accuracy, row.metrics["test/accuracy"], abs_tol=1e-9):
        raise CheckFailed(f"saved weights give test accuracy {accuracy}, recorded {row.metrics['test/accuracy']}")
    plugin = row.provenance["plugin"]
    return (f"trial {trial.id} done: {len(row.metrics)} metrics, {len(curves)} curve points, provenance "
            f"{plugin['distribution']} {plugin['version']}, saved weights reload")


def _run_and_read_back(ctx: Context, run_dir: str) -> tuple[Trial, StoredTrial, list[CurvePoint]]:
    """Resolve a 5-step suite of the trainer (defaults) on digits, run it with `run_trial`, record it in a
    `Store` as the executor does, and read the trial row and curves back from a fresh connection."""
    from . import __version__, config
    from .runner import run_trial
    from .store import Store

    with failing("resolving the default hyper-parameters"):
        hp = {k: v for k, v in ctx.hparams().items() if k != "horizon_steps"}  # config.py fills it
    suite = {"name": "check-plugin", "datasets": ["digits"], "seeds": 1, "models": [KIT_MODEL],
             "budget": {"steps": 5}, "eval": {"points": 1}, "robustness": {"examples": 0},
             "algorithms": [{"id": ctx.cls.name, **hp}]}
    with registry.registered(ctx.entry):  # a class from a test module is found by the runner's discover()
        with failing("resolving a one-trial suite"):
            trial = config.resolve(suite, registry.discover(), str(ctx.device), __version__)[0]
        result = run_trial(trial, run_dir)
    store = Store(run_dir)
    store.add_trials([trial])
    store.finish_trial(result)
    store.close()
    store = Store.open(run_dir)
    row, curves = store.trials()[0], store.curves(trial.id).get(trial.id, [])
    store.close()
    return trial, row, curves


def _record_problems(row: StoredTrial, trial: Trial, entry: registry.Entry, curves: list[CurvePoint]) -> list[str]:
    problems = []
    stored, given = json.loads(json.dumps(dict(row.hparams))), json.loads(json.dumps(dict(trial.hparams)))
    if stored != given:
        problems.append(f"stored hyper-parameters {stored} != {given}")
    if row.provenance.get("plugin") != entry.provenance():
        problems.append(f"provenance {row.provenance.get('plugin')} != {entry.provenance()}")
    for name in ("test/accuracy", "test/loss", "cost/steps", "cost/flops", "cost/forward_passes"):
        if row.metrics.get(name) is None:
            problems.append(f"metric {name} missing or not finite")
    if row.metrics.get("cost/steps") != 5:
        problems.append(f"cost/steps = {row.metrics.get('cost/steps')}, not 5")
    if not any(point.metric == "test/accuracy" for point in curves):
        problems.append("no test/accuracy curve")
    return problems


CHECKS: dict[str, Callable[[Context], str]] = {
    "constructible": check_constructible,
    "unique_name": check_unique_name,
    "hparams_round_trip": check_hparams_round_trip,
    "search_space": check_search_space,
    "init_stores_only": check_init_stores_only,
    "runs": check_runs,
    "deterministic": check_deterministic,
    "uses_given_generator": check_uses_given_generator,
    "loss_decreases": check_loss_decreases,
    "batch_not_mutated": check_batch_not_mutated,
    "step_stats_plausible": check_step_stats_plausible,
    "step_metrics": check_step_metrics,
    "eval_model": check_eval_model,
    "trial_recorded": check_trial_recorded,
}


def check_trainer(trainer: type | registry.Entry, device: str = "cpu", only: list[str] | None = None,
                  hparams: dict[str, Any] | None = None) -> list[CheckResult]:
    """Run every check (or those named in `only`) on a trainer class or registry entry, its runs with `hparams`
    over the defaults; never raises for the trainer's faults."""
    entry = trainer if isinstance(trainer, registry.Entry) else registry.entry_for_class(trainer)
    results = []
    with single_thread():
        ctx = Context(entry, device, hparams)
        for name, check in CHECKS.items():
            if only is not None and name not in only:
                continue
            start = time.perf_counter()
            try:
                reason, passed = check(ctx), True
            except CheckFailed as exc:
                reason, passed = str(exc), False
            except Exception as exc:  # the trainer's fault surfacing where no check expected it
                reason, passed = f"unexpected {describe(exc)}", False
            results.append(CheckResult(name, passed, reason, time.perf_counter() - start))
    return results


_CONTEXTS: dict[tuple, Context] = {}  # pytest runs the checks one test at a time: they share the runs


def _check_one(name: str, trainer: type | registry.Entry, device: str = "cpu") -> None:
    """Run one check for pytest: returns quietly or raises CheckFailed (an AssertionError) with the reason."""
    entry = trainer if isinstance(trainer, registry.Entry) else None
    key = (id(entry.cls if entry else trainer), device)
    with single_thread():
        if key not in _CONTEXTS:
            _CONTEXTS[key] = Context(entry or registry.entry_for_class(trainer), device)
        try:
            CHECKS[name](_CONTEXTS[key])
        except CheckFailed:
            raise
        except Exception as exc:
            raise CheckFailed(f"unexpected {describe(exc)}") from exc


def parametrize_with_checks(trainers: list[type | registry.Entry], device: str = "cpu") -> pytest.MarkDecorator:
    """A `pytest.mark.parametrize` over (trainer, check) for trainer classes or registry entries: decorate
    `test(trainer, check)` whose body is `check(trainer)`. Test ids read `<name>-<check>`; a failing check raises
    CheckFailed (an AssertionError) with its reason."""
    import pytest

    params = [pytest.param(cls, _named(partial(_check_one, name, device=device), name), id=f"{cls.name}-{name}")
              for cls in trainers for name in CHECKS]
    return pytest.mark.parametrize("trainer, check", params)


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = fn.__qualname__ = f"check_{name}"  # type: ignore[attr-defined]
    return fn
