"""Where a population is evaluated: the backend protocol behind `learnbench.population`'s evaluate functions.

Where members are evaluated is a resource of the run, not a trainer's choice. The runner may install a `Backend`
for a trial (`evaluated_by`; `learnbench.population_ray.ActorBackend` for `resources.actors = N`); while one is
installed, `population.evaluate`, `evaluate_mirrored` and `evaluate_perturbed` hand it every call as an
`EvaluationRequest` instead of computing in this process, and a backend must answer exactly what the call would
have returned here (same members, same order, same device). With no backend installed every call computes in
process. Trainers never see this module: they call `learnbench.population` either way.

A request carries the caller's rows `[R, n_params]` and, when they are windows of a noise table
(`learnbench.noise.drawn_from`), their table and offsets, so a backend holding copies of the table (Salimans et al.
2017's design) sends only the offsets; any other rows (a population matrix, fresh normals) it must send as they are.
A backend is told, off the clock, when a population method gets ready (`Backend.prepare`): when a trainer flattens
its model (`population.flatten`, which every built-in does in `setup`) and when it draws a noise table.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:  # noise.py tells the installed backend of new tables: it imports this module
    from .noise import NoiseTable, TableRows


@dataclass(frozen=True, eq=False)  # tensor fields: compared by identity
class EvaluationRequest:
    """One `learnbench.population` evaluate call, as a backend receives it. The members are:

    * `rows` themselves when `center` is None (`population.evaluate`);
    * `center + sigma * rows` (`evaluate_perturbed`), or with `mirrored` the `2R` members `center + sigma * rows`
      then `center - sigma * rows` (`evaluate_mirrored`; results `[2R]`: all `+`, then all `-`)."""

    model: nn.Module
    rows: Tensor
    """`[R, n_params]`: the caller's tensor (a population matrix or noise rows)."""
    drawn: TableRows | None
    """Where `rows` were read from when they are a noise table's windows (`table.recipe` and `offsets [R]`): a
    backend holding the table may send the offsets instead, after checking `rows` still equals those windows."""
    center: Tensor | None
    """`[n_params]`, or None when `rows` are the members."""
    sigma: float | Tensor | None
    """A float or `[n_params]`; None when `rows` are the members."""
    x: Tensor
    y: Tensor
    mirrored: bool
    chunk_size: int | None
    memory_bytes: int


class Backend(Protocol):
    """Evaluates populations somewhere else than this process (`learnbench.population_ray.ActorBackend`). Its
    `str()` names it in error messages (`resources.actors = 4 (Ray actors)`)."""

    def prepare(self, table: NoiseTable | None = None) -> None:
        """A population method is getting ready while this backend is installed (off the clock: trainers flatten
        their model and draw tables in `setup`): start what evaluates, and with `table` (just drawn), make its
        copies. A ValueError if that cannot be done."""

    def evaluate(self, request: EvaluationRequest) -> tuple[Tensor, Tensor]:
        """`(loss, accuracy)` exactly as the same call computed in this process would give them (same order, same
        device); a ValueError for a call it cannot serve (another model, table rows changed after sampling)."""


_installed: Backend | None = None  # set by `evaluated_by`


def installed() -> Backend | None:
    """The backend evaluating populations now, or None (in process)."""
    return _installed


@contextmanager
def evaluated_by(backend: Backend) -> Iterator[Backend]:
    """Within the block, every `learnbench.population` evaluate call is computed by `backend`. The previous
    backend (usually none) is restored on exit, error or not; closing the backend is its owner's business."""
    global _installed
    previous, _installed = _installed, backend
    try:
        yield backend
    finally:
        _installed = previous
