"""Search spaces for equal-budget tuning (`learnbench tune`): what a trainer declares next to its hyper-parameters.

A trainer may declare a class attribute

    search_space: ClassVar[dict[str, Dimension]] = {
        "lr": LogUniform(1e-4, 1e-1),       # where the range comes from, in a comment
        "popsize": Choice((16, 32, 64)),
    }

one entry per tuned hyper-parameter, independent of dataset and model (AlgoPerf's external-tuning rule: a
submission's space is workload-independent). Every other hyper-parameter keeps its value from the suite entry.
`space_for` gives the space for one entry (a class may adjust a range to the entry's other choices, as
backprop scales its learning rate to the optimizer's); `suggest` draws a configuration through an Optuna trial (its samplers: scrambled Sobol, random, TPE), so the
dimensions map one to one onto Optuna's distributions; `corners` lists the extreme configurations that
`learnbench check-plugin` runs through the trainer's `validate()`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Union

if TYPE_CHECKING:  # optuna is imported only by `learnbench tune`
    import optuna


@dataclass(frozen=True)
class LogUniform:
    """A float drawn uniformly in log space between low and high (both > 0): learning rates, step sizes."""

    low: float
    high: float

    def corners(self) -> tuple[float, ...]:
        return (self.low, self.high)


@dataclass(frozen=True)
class Uniform:
    """A float drawn uniformly between low and high: momentum, rates in [0, 1]."""

    low: float
    high: float

    def corners(self) -> tuple[float, ...]:
        return (self.low, self.high)


@dataclass(frozen=True)
class IntRange:
    """An integer from low to high inclusive, on a grid of `step` (a population of mirrored pairs: step 2)."""

    low: int
    high: int
    step: int = 1

    def corners(self) -> tuple[int, ...]:
        return (self.low, self.low + (self.high - self.low) // self.step * self.step)


@dataclass(frozen=True)
class Choice:
    """One of a few values (strings, numbers, booleans): an optimizer, a variant, a set of population sizes."""

    options: tuple[Any, ...]

    def corners(self) -> tuple[Any, ...]:
        return tuple(self.options)


Dimension = Union[LogUniform, Uniform, IntRange, Choice]


def check(space: Mapping[str, Dimension], hparams: Mapping[str, Any], where: str) -> None:
    """ValueError when a name is not a hyper-parameter or a dimension is malformed (empty, reversed, non-positive
    log bounds, non-numeric or, for IntRange, non-integer bounds, options Optuna cannot store)."""
    for name, dim in space.items():
        if name not in hparams:
            raise ValueError(f"{where}: search_space names {name!r}, which is not a hyper-parameter")
        _check_dimension(dim, f"{where}: search_space[{name!r}]")


def _check_dimension(dim: Dimension, where: str) -> None:
    if isinstance(dim, Choice):
        if not isinstance(dim.options, (tuple, list)) or not dim.options:
            raise ValueError(f"{where} needs a non-empty tuple of options; got {dim.options!r}")
        odd = [v for v in dim.options if v is not None and not isinstance(v, (bool, int, float, str))]
        if odd:  # what Optuna's suggest_categorical stores, and what a JSON trial config can hold
            raise ValueError(f"{where}: options must be None, bool, int, float or str; got {odd[0]!r}")
        return
    if not isinstance(dim, (LogUniform, Uniform, IntRange)):
        raise ValueError(f"{where} = {dim!r} is not a LogUniform, Uniform, IntRange or Choice")
    kinds = (int,) if isinstance(dim, IntRange) else (int, float)
    bounds = (dim.low, dim.high, dim.step) if isinstance(dim, IntRange) else (dim.low, dim.high)
    if not all(isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v) for v in bounds):
        raise ValueError(f"{where} = {dim} needs {'int bounds and step' if kinds == (int,) else 'finite bounds'}")
    if not dim.low <= dim.high or (isinstance(dim, LogUniform) and dim.low <= 0):
        raise ValueError(f"{where} = {dim} is empty or, on a log scale, not positive")
    if isinstance(dim, IntRange) and dim.step < 1:
        raise ValueError(f"{where} needs step >= 1; got {dim.step}")


def space_for(cls: type, hparams: Mapping[str, Any]) -> dict[str, Dimension] | None:
    """The space a tuner searches for an entry of `cls` with these hyper-parameters: the class's `search_space`,
    passed through its optional `adjust_search_space(space, hparams)` when a range depends on another choice of the
    entry (backprop's learning rate on its optimizer); None when the class declares none."""
    space = getattr(cls, "search_space", None)
    adjust = getattr(cls, "adjust_search_space", None)
    if isinstance(space, Mapping) and callable(adjust):
        return adjust(dict(space), hparams)
    return dict(space) if isinstance(space, Mapping) else space


def corners(space: Mapping[str, Dimension]) -> Iterator[dict[str, Any]]:
    """Every combination of each dimension's extremes (a Choice's every option): 2^d configurations or so."""
    names = list(space)
    for values in itertools.product(*(space[n].corners() for n in names)):
        yield dict(zip(names, values))


def suggest(trial: optuna.Trial, space: Mapping[str, Dimension]) -> dict[str, Any]:
    """One configuration drawn through an Optuna trial (the sampler decides the point)."""
    out: dict[str, Any] = {}
    for name, dim in space.items():
        if isinstance(dim, LogUniform):
            out[name] = trial.suggest_float(name, dim.low, dim.high, log=True)
        elif isinstance(dim, Uniform):
            out[name] = trial.suggest_float(name, dim.low, dim.high)
        elif isinstance(dim, IntRange):
            out[name] = trial.suggest_int(name, dim.low, dim.corners()[1], step=dim.step)  # high on the grid
        else:
            out[name] = trial.suggest_categorical(name, list(dim.options))
    return out


def is_log(dim: Dimension) -> bool:
    """Whether plots of accuracy against this hyper-parameter want a log axis."""
    return isinstance(dim, LogUniform)
