"""Batched population evaluation and the helpers every evolution strategy shares.

A population is a matrix `[P, n_params]`: row i is member i's parameters, flattened in `model.named_parameters()`
order (`Layout`). `evaluate(model, population, x, y)` returns every member's cross-entropy loss and accuracy on one
shared minibatch without copying a module per member; `evaluate_mirrored` does the same for the antithetic pairs
`center +- sigma * noise` of an ES generation and shares the first layer's work between the two members of a pair
(the first layer is linear in its weights: `x (W +- E)^T = x W^T +- x E^T`, so that layer costs half);
`evaluate_perturbed` for the members `center + sigma * noise`. Buffers are shared by all members and never evolved;
the model is evaluated in eval mode (dropout off, BatchNorm on its stored statistics), so a member's fitness and the
test accuracy of the same parameters agree. `rank_order` and `centered_ranks` shape fitness (NaN never best).

What lives where:

* here: the flat vector (`Layout`, `flatten`, `load`), the evaluate functions (chunking, mirrored pairs) and fitness
  shaping: what trainers call;
* `learnbench.population_engines`: how a chunk of members is computed in process, per model type and device (the
  shared-input matmul of the mlp, the fused first convolution of the cnn on CPU, `vmap` otherwise), with the
  measurements that chose each path;
* `learnbench.noise`: Salimans et al. (2017)'s shared noise table (`NoiseTable`) and fresh normals (`normal`);
* `learnbench.population_backend`: the `Backend` protocol, and `evaluated_by`, which installs one;
* `learnbench.population_ray`: the Ray actor backend of the run resource `resources.actors = N`.

Chunks are sized so that one chunk's activations stay under `memory_bytes` (default 256 MiB); results do not
depend on the chunk size beyond float rounding.

Backends. Where a population is evaluated is a resource of the run, not a trainer's choice: while a backend is
installed (`population_backend.evaluated_by`), every evaluate call here is handed to it as an `EvaluationRequest`
(the rows, with their noise-table offsets when `learnbench.noise.drawn_from` names them) and nothing is computed in
this process; `flatten` tells it a population method is setting up (`Backend.prepare`, off the clock). With no
backend installed every call computes here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import population_backend
from .noise import drawn_from
from .population_backend import Backend, EvaluationRequest
from .population_engines import cross_entropy, engine_for, eval_mode

DEFAULT_MEMORY_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Layout:
    """Where each trainable parameter of a model lives in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    n_params: int

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        sizes = [p.numel() for _, p in named]
        offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()] if sizes else [0]
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named), tuple(offsets[:-1]), offsets[-1])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of `flat [..., n_params]` as `{name: [..., *shape]}`."""
        lead = flat.shape[:-1]
        return {name: flat[..., o:o + math.prod(s)].view(*lead, *s)
                for name, s, o in zip(self.names, self.shapes, self.offsets)}


def flatten(model: nn.Module) -> Tensor:
    """The model's trainable parameters as one new vector `[n_params]` (Layout order). With a backend installed,
    first tells it a population method is setting up (`Backend.prepare`: trainers flatten their model in `setup`,
    so whatever the backend starts, it starts off the clock)."""
    backend = population_backend.installed()
    if backend is not None:
        backend.prepare()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


@torch.no_grad()
def load(model: nn.Module, vector: Tensor) -> nn.Module:
    """Copy `vector [n_params]` into the model's trainable parameters; returns the model."""
    for (name, value) in Layout.of(model).unflatten(vector).items():
        model.get_parameter(name).copy_(value)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, population: Tensor, x: Tensor, y: Tensor, chunk_size: int | None = None,
             memory_bytes: int = DEFAULT_MEMORY_BYTES) -> tuple[Tensor, Tensor]:
    """Loss and accuracy of every member of `population [P, n_params]` on the shared batch `x`, `y [B]`.

    Returns `(loss [P], accuracy [P])`: mean cross-entropy and fraction correct (argmax) per member, exactly what a
    loop loading each row into `model` and calling it would give, to float rounding. `chunk_size` members are
    evaluated at once (default: as many as fit in `memory_bytes` of activations). A member with non-finite
    parameters gets a NaN loss, never an error. With a backend installed, the backend evaluates it.
    """
    backend = population_backend.installed()
    if backend is not None:
        return _delegate(backend, model, population, None, None, x, y, False, chunk_size, memory_bytes)
    return _evaluate(model, population, x, y, chunk_size, memory_bytes)


@torch.no_grad()
def evaluate_mirrored(model: nn.Module, center: Tensor, noise: Tensor, sigma: float | Tensor, x: Tensor, y: Tensor,
                      chunk_size: int | None = None,
                      memory_bytes: int = DEFAULT_MEMORY_BYTES) -> tuple[Tensor, Tensor]:
    """`evaluate` for the antithetic population `[center + sigma * noise; center - sigma * noise]`.

    `center [n_params]`, `noise [H, n_params]`, `sigma` a float or `[n_params]`. Returns `(loss [2H], accuracy
    [2H])`, rows `0..H-1` for `+`, `H..2H-1` for `-`. The population is built chunk by chunk, never as a whole, and
    the first layer's output for the center is computed once (see the module docstring). With a backend installed,
    the backend evaluates it (from the table offsets when `noise` came from `NoiseTable.sample`).
    """
    backend = population_backend.installed()
    if backend is not None:
        return _delegate(backend, model, noise, center, sigma, x, y, True, chunk_size, memory_bytes)
    return _evaluate_mirrored(model, center, noise, sigma, x, y, chunk_size, memory_bytes)


@torch.no_grad()
def evaluate_perturbed(model: nn.Module, center: Tensor, noise: Tensor, sigma: float | Tensor, x: Tensor, y: Tensor,
                       chunk_size: int | None = None,
                       memory_bytes: int = DEFAULT_MEMORY_BYTES) -> tuple[Tensor, Tensor]:
    """`evaluate` for the population `center + sigma * noise` (`center [n_params]`, `noise [R, n_params]`, `sigma`
    a float or `[n_params]`): `(loss [R], accuracy [R])`. With a backend installed, the backend evaluates it (from
    the table offsets when `noise` came from `NoiseTable.sample`)."""
    backend = population_backend.installed()
    if backend is not None:
        return _delegate(backend, model, noise, center, sigma, x, y, False, chunk_size, memory_bytes)
    # [R, n_params]: the whole population at once, freed when the call returns
    members = torch.addcmul(center, noise, sigma) if torch.is_tensor(sigma) else center + sigma * noise
    return _evaluate(model, members, x, y, chunk_size, memory_bytes)


def rank_order(loss: Tensor) -> Tensor:
    """Member indices `[P]` from best (lowest loss) to worst; NaN losses come last, so a NaN member is never the
    best. Ties keep index order."""
    key = torch.where(torch.isnan(loss), torch.full_like(loss, math.inf), loss)
    return key.argsort(stable=True)


def centered_ranks(loss: Tensor) -> Tensor:
    """Centred-rank fitness shaping (Salimans et al. 2017) for minimisation: utilities `[P]` evenly spaced in
    [-0.5, 0.5], +0.5 for the lowest loss, -0.5 for the highest or a NaN."""
    n = loss.shape[0]
    ranks = torch.empty(n, device=loss.device, dtype=loss.dtype)
    ranks[rank_order(loss)] = torch.arange(n, device=loss.device, dtype=loss.dtype)  # 0 = best
    return 0.5 - ranks / max(n - 1, 1)


# ---------------------------------------------------------------------------------------------------- internals

def _delegate(backend: Backend, model: nn.Module, rows: Tensor, center: Tensor | None, sigma: float | Tensor | None,
              x: Tensor, y: Tensor, mirrored: bool, chunk_size: int | None,
              memory_bytes: int) -> tuple[Tensor, Tensor]:
    """The call as a request to `backend`: `rows` are the members (`center` None) or the noise around `center`;
    `drawn` names them when they are a noise table's windows, so the backend may send offsets instead."""
    request = EvaluationRequest(model=model, rows=rows, drawn=drawn_from(rows), center=center, sigma=sigma, x=x,
                                y=y, mirrored=mirrored, chunk_size=chunk_size, memory_bytes=memory_bytes)
    return backend.evaluate(request)


def _evaluate(model: nn.Module, population: Tensor, x: Tensor, y: Tensor, chunk_size: int | None,
              memory_bytes: int) -> tuple[Tensor, Tensor]:
    engine, layout = engine_for(model, x), Layout.of(model)
    chunk = chunk_size or engine.chunk_for(x.shape[0], memory_bytes)
    losses, accs = [], []
    with eval_mode(model):
        for start in range(0, population.shape[0], chunk):
            params = layout.unflatten(population[start:start + chunk])
            logits = engine.finish(engine.first(x, params[engine.first_weight]) if engine.first_weight else x,
                                   params)  # [C, B, K]
            losses.append(cross_entropy(logits, y))
            accs.append((logits.argmax(-1) == y).float().mean(-1))
    return torch.cat(losses), torch.cat(accs)


def _evaluate_mirrored(model: nn.Module, center: Tensor, noise: Tensor, sigma: float | Tensor, x: Tensor, y: Tensor,
                       chunk_size: int | None, memory_bytes: int) -> tuple[Tensor, Tensor]:
    engine, layout = engine_for(model, x), Layout.of(model)
    chunk = max(1, (chunk_size or engine.chunk_for(x.shape[0], memory_bytes)) // 2)
    base, first = layout.unflatten(center), engine.first_weight
    sigmas = layout.unflatten(sigma) if torch.is_tensor(sigma) and sigma.ndim else None
    plus, minus = [], []
    with eval_mode(model):
        shared = engine.center(x, base[first]) if first else None
        for start in range(0, noise.shape[0], chunk):
            # Only the parameters after the first layer are materialised per member: [2C, ...] each.
            params, h = {}, x
            for name, eps in layout.unflatten(noise[start:start + chunk]).items():
                scale = float(sigma) if sigmas is None else 1.0
                eps = eps if sigmas is None else eps * sigmas[name]
                if name == first:
                    h = engine.first(x, eps, shared=shared, scale=scale)
                else:
                    step = eps * scale
                    params[name] = torch.cat([base[name] + step, base[name] - step])
            logits = engine.finish(h, params)  # [2C, B, K]
            n = logits.shape[0] // 2
            results = (cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean(-1))
            plus.append([r[:n] for r in results])
            minus.append([r[n:] for r in results])
    return tuple(torch.cat([*(p[i] for p in plus), *(m[i] for m in minus)]) for i in range(2))
