"""An evolution strategy's generation spread over Ray actors (`workers = N` on `openai-es` and `snes`).

Salimans et al. (2017, "Evolution Strategies as a Scalable Alternative to Reinforcement Learning", section 2.1 and
Algorithm 2) scale ES to thousands of cores by sending each worker only scalars: every worker holds the same shared
noise table, so a perturbation is named by its offset into the table, and a fitness is one number. Here:

* `setup` starts N actors (`Evaluator`, one CPU and one torch thread each). Each rebuilds the trainer's model from a
  JSON spec and safetensors bytes (`describe`: learnbench's built-in models only; nothing crosses as a pickled
  object) and the trainer's `NoiseTable` from the generator state it was drawn from, so its table is bit-identical.
* Each generation the driver draws the window offsets from its generator (the draws `NoiseTable.sample` makes),
  puts the mean (and SNES's per-parameter sigma), the minibatch and the labels once into Ray's object store
  (safetensors bytes: each node fetches them once), and gives each actor a contiguous slice of the offsets. Actors
  return their members' losses; the driver gathers its own copy of the noise rows while they compute.
* Every member's loss is computed by the same `learnbench.population` code as in process, and does not depend on
  which other members share its chunk or on the thread count (measured bit-identical on this CPU for the mlp and the
  cnn), so `workers` changes where a generation is computed, not its result: it is left out of the trial id.

What crosses per generation: the mean (45 KB for the 11,274-parameter cnn), the minibatch (256 MNIST images:
800 KB), `popsize/2` offsets to the actors; `popsize` losses back. That pays when the evaluation dominates, which on
CPU it does for any real network: the gradient estimate and the Adam step stay on the driver.

Accounting. `StepStats.forward_passes` counts every member whoever evaluates it, and the runner's FLOPs are nominal
(`learnbench.cost`: dense model FLOPs per example-pass), so a generation costs the same on actors as in process.
`cost/peak_memory_bytes` is the driver's alone (each actor also holds the noise table: 128 MiB by
default). Under `--executor ray` the trial's placement group reserves one CPU per actor beside the trial's own task.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from typing import Any, Callable

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from . import models, population
from .spec import TaskInfo

ACTOR_START_TIMEOUT_S = 120  # outside a placement group Ray queues actors until CPUs free up
INSTALL_HINT = "pip install 'learnbench[ray]'"


def import_ray():
    """The `ray` module, or a ValueError naming the extra to install (raised by the trainer's `setup`)."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"workers > 0 evaluates the population on Ray actors, but Ray is not installed: "
                         f"{INSTALL_HINT}") from None
    return ray


def describe(model: nn.Module, input_shape: tuple[int, ...], n_classes: int) -> dict[str, Any]:
    """The `learnbench.models` spec that rebuilds `model`'s architecture, checked by rebuilding it; a ValueError
    for any other module (a user module's code and constructor arguments cannot be named without pickling it)."""
    acts = {cls: name for name, cls in models.ACTIVATIONS.items()}
    layers = list(model.modules())
    activation = next((acts[type(m)] for m in layers if type(m) in acts), "identity")
    if isinstance(model, models.MLP):
        norm = "batch" if _has(layers, nn.BatchNorm1d) else "layer" if _has(layers, nn.LayerNorm) else "none"
        spec = {"kind": "resmlp" if model.residual else "mlp", "hidden": [b[0].out_features for b in model.blocks],
                "activation": activation, "norm": norm}
    elif isinstance(model, models.ConvNet):
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        norm = "batch" if _has(layers, nn.BatchNorm2d) else "layer" if _has(layers, nn.GroupNorm) else "none"
        spec = {"kind": "cnn", "channels": [c.out_channels for c in convs], "kernel": convs[0].kernel_size[0],
                "activation": activation, "norm": norm}
    elif isinstance(model, models.LeNet5):
        spec = {"kind": "lenet", "activation": activation,
                "pool": "avg" if _has(layers, nn.AvgPool2d) else "max"}
    else:
        raise ValueError(f"workers > 0 supports learnbench's built-in models (mlp, resmlp, cnn, lenet); got "
                         f"{type(model).__name__} (evaluate it in process: workers = 0)")
    rebuilt = models.build(spec, input_shape, n_classes)
    if repr(rebuilt) != repr(model) or getattr(rebuilt, "residual", None) != getattr(model, "residual", None):
        raise ValueError(f"workers > 0: cannot describe this {type(model).__name__} as a learnbench model spec "
                         f"(closest: {spec}); evaluate it in process: workers = 0")
    return spec


def _has(layers: list[nn.Module], cls: type) -> bool:
    return any(isinstance(m, cls) for m in layers)


def pool_for(model: nn.Module, task: TaskInfo, workers: int, table_state: Tensor, table_size: int,
             chunk_size: int | None) -> Pool | None:
    """The trainer's actors, or None when `workers` is 0 (evaluate in process). `table_state`: the generator's
    state when the noise table was drawn."""
    if not workers:
        return None
    if task.device.type != "cpu" or not table_size:
        raise ValueError("workers > 0 needs device cpu and a noise table (noise_table > 0)")
    return Pool(model, task.input_shape, task.n_classes, workers, table_state, table_size, chunk_size)


class Pool:
    """N `Evaluator` actors holding a copy of the model and of the trainer's noise table."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], n_classes: int, workers: int,
                 table_state: Tensor, table_size: int, chunk_size: int | None):
        ray = self.ray = import_ray()
        spec = json.dumps(describe(model, input_shape, n_classes))
        state = save_tensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        if not ray.is_initialized():  # the local executor, or a script: a local instance (a Ray task inherits one)
            ray.init(num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False,
                     logging_level=logging.WARNING)
        # Ray kills an actor once its last handle is gone, but a finished trainer in a reference cycle (a
        # scheduler's lambda holds it) keeps its actors, and their CPUs, until the next garbage collection.
        gc.collect()
        total = ray.cluster_resources().get("CPU", 0)
        if workers > total:
            raise ValueError(f"workers={workers} needs {workers} CPUs for its actors; the Ray cluster has {total:g}")
        actor = ray.remote(num_cpus=1, max_restarts=0)(Evaluator)
        self.actors = [actor.remote(spec, input_shape, n_classes, state, frozen, table_state.numpy().tobytes(),
                                    table_size, chunk_size) for _ in range(workers)]
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"{workers} Ray actor(s) of one CPU each did not start within "
                               f"{ACTOR_START_TIMEOUT_S} s; free CPUs now: "
                               f"{ray.available_resources().get('CPU', 0):g} (lower workers)") from None

    def submit(self, center: Tensor, sigma: float | Tensor, offsets: Tensor, x: Tensor, y: Tensor,
               mirrored: bool) -> Callable[[], Tensor]:
        """Start evaluating the members the window `offsets [R]` describe: `center +- sigma * noise` pairs when
        `mirrored`, else `center + sigma * noise`. Returns a function that waits and gives the losses in
        `population.evaluate_mirrored`'s (`[2R]`: all `+`, then all `-`) or `population.evaluate`'s order (`[R]`)."""
        tensors = {"center": center, "x": x, "y": y}
        if torch.is_tensor(sigma):
            tensors["sigma"] = sigma
        shared = self.ray.put(save_tensors({k: v.detach().contiguous() for k, v in tensors.items()}))
        scale = None if torch.is_tensor(sigma) else float(sigma)
        slices = [s.tolist() for s in torch.tensor_split(offsets, len(self.actors)) if s.numel()]
        refs = [a.evaluate.remote(shared, s, scale, mirrored) for a, s in zip(self.actors, slices)]

        def result() -> Tensor:
            losses = [load_tensors(b)["loss"] for b in self.ray.get(refs)]
            if not mirrored:
                return torch.cat(losses)
            halves = [(l[:len(s)], l[len(s):]) for l, s in zip(losses, slices)]  # each actor's + then -
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves])

        return result


class Evaluator:
    """The actor: a model rebuilt from its spec and state, the noise table rebuilt from its generator state."""

    def __init__(self, spec: str, input_shape: tuple[int, ...], n_classes: int, state: bytes, frozen: list[str],
                 table_state: bytes, table_size: int, chunk_size: int | None):
        torch.set_num_threads(1)  # one CPU per actor (its Ray resource)
        self.model = models.build(json.loads(spec), tuple(input_shape), n_classes)
        self.model.load_state_dict(load_tensors(state))
        for name in frozen:
            self.model.get_parameter(name).requires_grad_(False)
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(table_state), dtype=torch.uint8))
        self.table = population.NoiseTable(generator, table_size, population.Layout.of(self.model).n_params,
                                           torch.device("cpu"))
        self.chunk_size = chunk_size

    def ready(self) -> int:
        return self.table.n_params

    def evaluate(self, shared: bytes, offsets: list[int], scale: float | None, mirrored: bool) -> bytes:
        """Losses of this actor's members as safetensors bytes (`{"loss": [2R] or [R]}`)."""
        tensors = load_tensors(shared)
        center, x, y = tensors["center"], tensors["x"], tensors["y"]
        sigma = tensors["sigma"] if scale is None else scale
        noise = self.table.rows(torch.tensor(offsets, dtype=torch.int64))  # [R, n_params]
        if mirrored:
            loss, _ = population.evaluate_mirrored(self.model, center, noise, sigma, x, y, chunk_size=self.chunk_size)
        else:
            members = torch.addcmul(center, noise, sigma) if scale is None else center + scale * noise  # [R, n]
            loss, _ = population.evaluate(self.model, members, x, y, chunk_size=self.chunk_size)
        return save_tensors({"loss": loss.contiguous()})
