"""Gaussian noise for evolution strategies: Salimans et al. (2017)'s shared noise table, and fresh normals.

Salimans, Ho, Chen, Sidor & Sutskever (2017, "Evolution Strategies as a Scalable Alternative to Reinforcement
Learning", section 2.1) draw one large block of N(0, 1) samples once and read each perturbation as a window into it
at a random offset: the rows have the same N(0, 1) marginals, cost a gather instead of fresh draws (on this CPU,
128 rows of 25,450: 0.7 ms against 12 ms for `torch.randn`, a quarter of an MLP generation), and a row is named by
one integer, which is all a distributed worker holding the same table needs.

* `NoiseTable(generator, size, n_params, device)`: the block (at least 8 windows' worth), drawn once from the
  trainer's generator; `sample(rows)` draws window offsets from the same generator, so runs stay reproducible.
* `TableRecipe`: what draws a table again bit for bit elsewhere (the generator state before the draw, as bytes:
  no pickling). `learnbench.population_ray`'s actors rebuild their copies from it.
* `drawn_from(noise)`: the `TableRows` (table and window offsets) a tensor that `sample` or `rows` returned holds,
  for as long as the tensor lives; None for any other tensor. A backend sends those offsets instead of the rows.
* `normal(generator, rows, n_params)`: fresh standard normals (a trainer's `noise_table = 0`); not named by offsets,
  so a backend sends such rows themselves.

An installed evaluation backend (`learnbench.population_backend`) is told of every new table at once
(`Backend.prepare`): trainers draw their tables in `setup`, so its copies are made off the clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import population_backend


@dataclass(frozen=True)
class TableRecipe:
    """What draws a `NoiseTable` again bit for bit: the state its generator had before the draw
    (`torch.Generator.get_state()` as bytes), that generator's device type, the block's size and the window
    length. Plain values, so a copy can be made in another process without pickling the table."""

    state: bytes
    device: str
    size: int
    n_params: int

    def key(self) -> str:
        """A short digest naming this table (what a backend's copies are filed under)."""
        digest = hashlib.sha256(self.state)
        digest.update(f"{self.device}:{self.size}:{self.n_params}".encode())
        return digest.hexdigest()[:16]

    def build(self) -> NoiseTable:
        """The table again, on CPU. Only a CPU generator's recipe: a CUDA generator draws another stream."""
        if self.device != "cpu":
            raise ValueError(f"a noise table drawn by a {self.device} generator can only be redrawn on {self.device}")
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(self.state), dtype=torch.uint8))
        return NoiseTable(generator, self.size, self.n_params, torch.device("cpu"))


class NoiseTable:
    """Gaussian noise rows as windows into one block of N(0, 1) samples (see the module docstring). The block is
    drawn once from `generator`; each row is the window at an offset drawn from the same generator. The block holds
    at least 8 windows' worth.

    The table keeps its `recipe` (the generator state it was drawn from), and every tensor `sample` or `rows`
    returns stays named by its offsets while it lives (`drawn_from`): that is all a backend sends elsewhere. An
    installed backend is told of a new table at once (`Backend.prepare`: trainers draw tables in `setup`, off the
    clock)."""

    def __init__(self, generator: torch.Generator, size: int, n_params: int, device: torch.device):
        self.generator, self.n_params = generator, n_params
        size = max(size, 8 * n_params)
        state = generator.get_state().numpy().tobytes()  # before the draw: the recipe's starting point
        self.recipe = TableRecipe(state, generator.device.type, size, n_params)
        self.table = torch.randn(size, generator=generator, device=generator.device).to(device)  # [size]
        backend = population_backend.installed()
        if backend is not None:
            backend.prepare(self)

    def sample(self, rows: int) -> Tensor:
        """Noise `[rows, n_params]`: a new tensor, rows at independent uniform offsets."""
        return self.rows(self.offsets(rows))

    def offsets(self, rows: int) -> Tensor:
        """`rows` independent uniform window offsets `[rows]`, drawn from the generator (what `sample` draws)."""
        return torch.randint(0, self.table.numel() - self.n_params + 1, (rows,), generator=self.generator,
                             device=self.generator.device)

    def rows(self, offsets: Tensor) -> Tensor:
        """Noise `[len(offsets), n_params]`: the windows at `offsets`, a new tensor, named by them (`drawn_from`).
        A table rebuilt from `recipe` gives the same rows for the same offsets."""
        noise = self.table.unfold(0, self.n_params, 1).index_select(0, offsets.to(self.table.device))
        _DRAWN[noise] = TableRows(self, offsets)
        return noise


@dataclass(frozen=True, eq=False)  # tensor fields: compared by identity
class TableRows:
    """Noise rows named by where they came from: the windows of `table` at `offsets [R]`."""

    table: NoiseTable
    offsets: Tensor

    def tensor(self) -> Tensor:
        """The rows `[R, n_params]`, gathered again."""
        return self.table.rows(self.offsets)


# tensor -> its TableRows, for as long as the tensor lives (keys by identity: a tensor's `==` is elementwise)
_DRAWN: WeakIdKeyDictionary = WeakIdKeyDictionary()


def drawn_from(noise: Tensor) -> TableRows | None:
    """The table windows `noise` holds if it is a tensor `NoiseTable.sample` or `NoiseTable.rows` returned (a
    slice or a computed tensor is not), else None. A tensor changed in place keeps its name: backends check."""
    return _DRAWN.get(noise)


def normal(generator: torch.Generator, rows: int, n_params: int, device: torch.device | None = None) -> Tensor:
    """Standard normal noise `[rows, n_params]` drawn from `generator` (on its device), moved to `device`."""
    noise = torch.randn(rows, n_params, generator=generator, device=generator.device)
    return noise if device is None else noise.to(device)
