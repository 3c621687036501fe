"""The runs the conformance checks share (`learnbench.testing` holds the checks and the public API).

A `Context` is one trainer class under test with the kit's tiny data: scikit-learn's 8x8 digits (1,797 images
[1, 8, 8], pixels / 16), loaded straight from scikit-learn so the kit needs no dataset file, and the MLP 64-32-10 of
`learnbench.models`. `Context.run(i)` constructs, sets up and steps the trainer `KIT_STEPS` times exactly as the
runner does (the runner's `Sampler` draws the batches, the same seeds, an evaluation in eval mode every 10 steps)
and records everything the checks look at; runs 0 and 1 use the same seed, so they must agree.
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import models, registry
from .spec import Batch, TaskInfo

KIT_STEPS = 40  # enough for every built-in to lower its loss on digits; a run takes well under a second for most
KIT_MODEL = {"kind": "mlp", "hidden": [32]}
KIT_SEED = 0
KIT_MAX_BATCH = 256  # used instead of a default batch_size larger than the kit's 1,797 examples


class CheckFailed(AssertionError):
    """Raised by a check with the reason it failed (an AssertionError, so pytest reports it as a failure)."""


@dataclass
class Run:
    """What one run of `KIT_STEPS` steps from fresh construction showed. `error`: __init__, setup or a step raised
    and the run stopped there; `eval_error`: eval_model() was unusable (the run went on without evaluations)."""

    losses: list[float] = field(default_factory=list)
    stats: list[Any] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    mutated: list[str] = field(default_factory=list)
    hparams_before: dict[str, Any] = field(default_factory=dict)
    hparams_after: dict[str, Any] = field(default_factory=dict)
    global_rng_used: list[str] = field(default_factory=list)
    loss_before: float = math.nan  # eval_model()'s mean cross-entropy on all kit data, before the first step
    loss_after: float = math.nan
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # eval_model()'s state dict after the steps
    model: nn.Module | None = None
    seconds: float = 0.0
    error: str | None = None
    eval_error: str | None = None

    def require(self) -> "Run":
        if self.error:
            raise CheckFailed(f"needs a run of the trainer, which failed (see `runs`): {self.error}")
        return self


class Context:
    """One trainer under test: its entry, the tiny data and the cached runs the checks share."""

    def __init__(self, entry: registry.Entry, device: str, given: dict[str, Any] | None = None):
        self.entry, self.cls, self.device = entry, entry.cls, torch.device(device)
        self.given = dict(given or {})  # hyper-parameters the runs use instead of the defaults (`--set`)
        self.runs: dict[int, Run] = {}
        self.x, self.y = _digits(self.device)  # [1797, 1, 8, 8], [1797]
        self.task = TaskInfo((1, 8, 8), 10, int(self.x.shape[0]), self.device)
        self.notes: list[str] = []

    def hparams(self) -> dict[str, Any]:
        """The defaults (or the given values) as a suite records them, with the kit's two adjustments (said in the
        output)."""
        hp = registry.resolve_hparams(self.cls, dict(self.given), "check-plugin")
        if isinstance(hp.get("batch_size"), int) and hp["batch_size"] > self.task.n_train:
            hp["batch_size"] = KIT_MAX_BATCH
            self._note(f"batch_size {KIT_MAX_BATCH} (the default exceeds the kit's {self.task.n_train} examples)")
        if "horizon_steps" in hp and hp["horizon_steps"] is None:
            hp["horizon_steps"] = KIT_STEPS  # as config.py fills it from a step budget
        return hp

    def corner_problem(self, corner: dict[str, Any], base: dict[str, Any]) -> str | None:
        """What is wrong with one search-space corner, or None: its values through resolve_hparams (their type
        hints), then `base` (the kit's defaults) updated with them through the constructor and the trainer's
        optional `validate([task])`, called as the suite loader (`config._check_values`) calls it."""
        try:
            typed = registry.resolve_hparams(self.cls, dict(corner), "search_space")
        except Exception as exc:  # UsageError: a value its type hint refuses
            return str(exc)
        try:
            trainer = self.cls(**{**base, **{name: typed[name] for name in corner}})
        except Exception as exc:
            return f"__init__ raised {describe(exc)}"
        validate = getattr(self.cls, "validate", None)
        if not callable(validate):
            return None
        takes_task = len(inspect.signature(validate).parameters) > 1  # (self, task)
        try:
            trainer.validate(self.task) if takes_task else trainer.validate()
        except Exception as exc:
            return f"validate() raised {describe(exc)}"
        return None

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(KIT_SEED)  # the runner's rule: the seed fixes the initial weights
            return models.build(KIT_MODEL, self.task.input_shape, self.task.n_classes).to(self.device)

    def run(self, index: int = 0) -> Run:
        """Run `index` (0 or 1): the same seed each time, so two runs must agree."""
        if index not in self.runs:
            self.runs[index] = _train(self)
        return self.runs[index]


# --- the run the checks share -------------------------------------------------------------------------------------

def _train(ctx: Context) -> Run:
    """Construct, set up and step the trainer as the runner does, watching everything the checks need."""
    from .runner import Sampler, _generator

    run = Run()
    model = ctx.build_model()
    rng = _global_rng_states(ctx.device)
    start = time.perf_counter()
    try:
        with _phase("resolving the default hyper-parameters"):
            hparams = ctx.hparams()
        with _phase("__init__"):
            trainer = ctx.cls(**hparams)
        with _phase("reading the hyper-parameters back"):
            run.hparams_before = plain(registry.hparams_of(trainer))
        with _phase("setup"):
            trainer.setup(model, ctx.task, _generator(KIT_SEED, 0, ctx.device))
        run.loss_before = _full_loss(ctx, trainer, run)
        sampler = Sampler(ctx.x, ctx.y, hparams["batch_size"], _generator(KIT_SEED, 1, ctx.device))
        for step in range(KIT_STEPS):
            _one_step(trainer, sampler.next(), step, run)
            if step % 10 == 9:
                _full_loss(ctx, trainer, run)  # an evaluation between steps, as the runner's curve points do
        run.loss_after = _full_loss(ctx, trainer, run)
        with _phase("reading the hyper-parameters back"):
            run.hparams_after = plain(registry.hparams_of(trainer))
    except _TrainerError as exc:
        run.error = str(exc)
    run.seconds = time.perf_counter() - start
    run.global_rng_used = [name for name, state in _global_rng_states(ctx.device).items()
                           if not torch.equal(state, rng[name])]
    return run


def _one_step(trainer, batch: Batch, step: int, run: Run) -> None:
    x, y, x_copy, y_copy = batch.x, batch.y, batch.x.clone(), batch.y.clone()
    with _phase(f"step {step}"):
        stats = trainer.step(batch)
    changed = [name for name, now, seen, copy in (("x", batch.x, x, x_copy), ("y", batch.y, y, y_copy))
               if now is not seen or not torch.equal(seen, copy)]
    if changed:
        run.mutated.append(f"step {step} changed {', '.join('batch.' + c for c in changed)}")
    run.stats.append(stats)
    run.batch_sizes.append(int(y.shape[0]))
    loss = getattr(stats, "loss", math.nan)
    run.losses.append(float(loss) if isinstance(loss, (numbers.Real, torch.Tensor)) and _scalar(loss) else math.nan)


@torch.no_grad()
def _full_loss(ctx: Context, trainer, run: Run) -> float:
    """Mean cross-entropy of eval_model() on all kit data in eval mode, its mode restored (the runner's way); the
    last usable eval_model() is kept in `run.model`. NaN (and `run.eval_error` set) when it is unusable."""
    try:
        with _phase("eval_model()"):
            model = trainer.eval_model()
            if not isinstance(model, nn.Module):
                raise _TrainerError(f"eval_model() returned {type(model).__name__}, not torch.nn.Module")
            was_training = model.training
            model.eval()
            logits = model(ctx.x)  # [N, C]
            model.train(was_training)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (ctx.x.shape[0], ctx.task.n_classes):
            raise _TrainerError(f"eval_model() gave {shape_of(logits)} for {ctx.x.shape[0]} inputs; expected "
                                f"[{ctx.x.shape[0]}, {ctx.task.n_classes}] logits")
    except _TrainerError as exc:
        run.eval_error = run.eval_error or str(exc)
        return math.nan
    run.model = model
    run.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return float(F.cross_entropy(logits.float(), ctx.y))


class _TrainerError(Exception):
    """The trainer raised (or returned nonsense) in a named phase; the message says where."""


@contextmanager
def _phase(name: str):
    try:
        yield
    except _TrainerError:
        raise
    except Exception as exc:
        raise _TrainerError(f"{name} raised {describe(exc)}") from exc


def _global_rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"torch CPU": torch.get_rng_state()}
    if device.type == "cuda":
        states["torch CUDA"] = torch.cuda.get_rng_state(device)
    return states


@lru_cache(maxsize=4)
def _digits(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # a CSV shipped inside scikit-learn: no file of ours, no network
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32)[:, None]  # [1797, 1, 8, 8] in [0, 1]
    return x.to(device), torch.tensor(bunch.target, dtype=torch.int64).to(device)


def plain(value: Any) -> Any:
    """Tuples as lists, recursively: the form hyper-parameters take in the JSON trial config."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _scalar(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) or value.numel() == 1


def shape_of(value: Any) -> str:
    return f"shape {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def describe(exc: BaseException) -> str:
    """`Type: message (file:line)`, the line being the innermost one outside torch: where the trainer went wrong."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    torch_dir = str(Path(torch.__file__).parent)
    ours = [f for f in frames if not f.filename.startswith(torch_dir)]
    frame = (ours or frames)[-1] if frames else None
    where = f" ({frame.filename}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


@contextmanager
def failing(what: str) -> Iterator[None]:
    """Turn the trainer's exception into a CheckFailed naming what was being done."""
    try:
        yield
    except CheckFailed:
        raise
    except Exception as exc:
        raise CheckFailed(f"{what} raised {describe(exc)}") from None


@contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread while the kit runs: its tiny matmuls only lose to thread start-up and, on a busy machine,
    to oversubscription (measured on this 2-core machine at load ~10: 40 backprop steps took about 2 s with two
    threads and 0.04 s with one). The caller's setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
