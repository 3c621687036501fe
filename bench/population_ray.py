"""Ray actors behind `learnbench.population`'s evaluate calls: the backend of the run resource `resources.actors = N`.

Salimans et al. (2017, "Evolution Strategies as a Scalable Alternative to Reinforcement Learning", section 2.1 and
Algorithm 2) scale ES to thousands of cores by sending each worker only scalars: every worker holds the same shared
noise table, so a perturbation is named by its offset into the table, and a fitness is one number. Here:

* The runner installs an `ActorBackend` for a trial whose suite sets `[resources] actors = N`
  (`population_backend.evaluated_by`, around setup, training and evaluation; the actors are killed when the trial
  ends). Trainers do not know: they call `population.evaluate`, `evaluate_mirrored` or `evaluate_perturbed` as
  always, and every such call goes to the actors.
* The actors start when a population method sets up (`Backend.prepare`: its `setup` flattens the model or draws a
  noise table, off the clock), so a trial that does neither (backprop) starts none: N `Evaluator` actors, one CPU
  and one torch thread each. Each builds the trial's model from the runner's `learnbench.models` spec (built-in
  kinds, and `factory` models whose module the actor can import) and each noise table from its
  `noise.TableRecipe` (the generator state it was drawn from), so its copy is bit-identical. Nothing crosses as a
  pickled object: JSON, bytes, safetensors.
* The first call checks that the evaluated module has the architecture the actors rebuilt and sends its state
  (buffers, frozen parameters). Every call puts what all members share (the minibatch and labels; for noise around
  a mean, the mean and SNES's per-parameter sigma) once into Ray's object store as safetensors bytes (each node
  fetches them once), and splits the rows `[R, n_params]` into N contiguous slices, one per actor:
  - rows read from a noise table (`noise.drawn_from`: openai-es, snes) travel as their window offsets; while the
    actors compute, the driver checks that the trainer's tensor still equals those windows (one gather, as the
    trainer's own `ask` costs);
  - any other rows (a population matrix given to `population.evaluate`: cma-es, ga; fresh normals:
    `noise_table = 0`) travel as themselves: each actor's slice is one safetensors object in the store, written
    before the call returns, so the caller may change its tensor afterwards.
  Actors return their members' losses and accuracies, merged in the in-process order.
* Every member's loss is computed by the same `learnbench.population` code as in process, and does not depend on
  which other members share its chunk or on the thread count (measured bit-identical on this CPU for the mlp and the
  cnn), so `actors` changes where a generation is computed, not its result: it is a resource, outside the trial id.

What it refuses, each a ValueError naming `resources.actors` (the trial fails with it, nothing falls back to in
process): Ray missing or a device other than cpu (trial start); a model the actors cannot rebuild (setup); a module
other than the one they built, a second module, or table rows changed after sampling (at the call).

What crosses per generation: what the members share (the mean: 45 KB for the 11,274-parameter cnn; the minibatch of
256 MNIST images: 800 KB) and the rows: `popsize/2` offsets for openai-es, but `popsize` full rows for cma-es and
the GA (P=256 members of the cnn: 11.5 MB, serialised and put in 15 ms on the 2-core dev machine). Evaluation
dominates either way on CPU: 64 cnn members on batch 256 took 0.43 s in process and 0.43-0.46 s on one actor,
sent as offsets, as fresh rows or as a population matrix. `popsize` losses and accuracies come back; selection,
the gradient estimate and the optimizer step stay on the driver.

Accounting. `StepStats.forward_passes` counts every member whoever evaluates it, and the runner's FLOPs are nominal
(`learnbench.cost`: dense model FLOPs per example-pass), so a generation costs the same on actors as in process.
`cost/peak_memory_bytes` is the driver's alone (each actor also holds the noise table: 128 MiB by default). Under
`--executor ray` the trial's placement group reserves one CPU per actor beside the trial's own task.
"""

from __future__ import annotations

import json
import logging
import os
from types import ModuleType
from typing import Any, Mapping

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from . import models, population
from .noise import NoiseTable, TableRecipe
from .population_backend import EvaluationRequest
from .spec import TaskInfo

ACTOR_START_TIMEOUT_S = 120  # outside a placement group Ray queues actors until CPUs free up
INSTALL_HINT = "pip install 'learnbench[ray]'"


def import_ray() -> ModuleType:
    """The `ray` module, or a ValueError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"resources.actors > 0 evaluates populations on Ray actors, but Ray is not installed: "
                         f"{INSTALL_HINT}") from None
    return ray


class ActorBackend:
    """A `population_backend.Backend`: N `Evaluator` actors holding the trial's model and copies of its noise
    tables. A context manager: the actors are killed on exit."""

    def __init__(self, actors: int, spec: Mapping[str, Any], task: TaskInfo):
        """`spec`: the trial's `learnbench.models` spec, which the actors build the model from. A ValueError for
        a device other than cpu or a missing Ray (so a trial fails at its start)."""
        if actors < 1:
            raise ValueError(f"resources.actors must be >= 1 for an actor backend; got {actors}")
        if task.device.type != "cpu":
            raise ValueError(f"resources.actors = {actors} evaluates populations on CPU actors; this trial runs on "
                             f"{task.device}: use device cpu, or resources.actors = 0")
        self.ray = import_ray()
        self.n, self.spec, self.task = actors, dict(spec), task
        self.actors: list[Any] = []  # Ray actor handles, started by the first `prepare` or call
        self._architecture = ""  # repr of the module the actors built
        self._tables: set[str] = set()  # recipe keys every actor holds
        self._model: nn.Module | None = None  # the module whose state the actors hold

    def __str__(self) -> str:
        return f"resources.actors = {self.n} (Ray actors)"

    def __enter__(self) -> ActorBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the actors (their CPUs return to the cluster); the backend can start new ones afterwards."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors, self._tables, self._model = [], set(), None

    def prepare(self, table: NoiseTable | None = None) -> None:
        """Start the actors if needed and have each build `table` (if given) from its recipe (waits: off the
        clock)."""
        recipe = table.recipe if table is not None else None
        if recipe is not None and recipe.device != "cpu":
            raise ValueError(f"{self}: the noise table was drawn by a {recipe.device} generator; the actors "
                             "redraw it on CPU (use device cpu)")
        self._start()
        if recipe is None or recipe.key() in self._tables:
            return
        self.ray.get([a.add_table.remote(recipe.key(), recipe.state, recipe.size, recipe.n_params)
                      for a in self.actors])
        self._tables.add(recipe.key())

    def evaluate(self, request: EvaluationRequest) -> tuple[Tensor, Tensor]:
        """The members `request` describes, evaluated by the actors: `(loss, accuracy)` in the in-process order."""
        self._bind(request.model)
        if request.drawn is not None:
            self.prepare(request.drawn.table)
        refs, sizes = self._submit(request)
        if request.drawn is not None and not torch.equal(request.rows, request.drawn.tensor()):  # while they compute
            raise ValueError(f"{self}: the noise tensor was changed after NoiseTable.sample; the actors evaluate "
                             "the table's windows, so a trainer must not modify its noise before evaluating it")
        results = [load_tensors(b) for b in self.ray.get(refs)]
        loss, accuracy = (_merge([r[name] for r in results], sizes, request.mirrored) for name in ("loss", "accuracy"))
        return loss.to(request.rows.device), accuracy.to(request.rows.device)

    def _start(self) -> None:
        if self.actors:
            return
        ray = self.ray
        if not ray.is_initialized():  # the local executor, or a script: a local instance (a Ray task inherits one)
            ray.init(num_cpus=max(os.cpu_count() or 1, self.n), include_dashboard=False,
                     logging_level=logging.WARNING)
        total = ray.cluster_resources().get("CPU", 0)
        if self.n > total:
            raise ValueError(f"{self} needs {self.n} CPUs for its actors; the Ray cluster has {total:g}")
        actor = ray.remote(num_cpus=1, max_restarts=0)(Evaluator)
        spec = json.dumps(self.spec)
        self.actors = [actor.remote(spec, self.task.input_shape, self.task.n_classes) for _ in range(self.n)]
        try:
            built = ray.get([a.ready.remote() for a in self.actors], timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"{self}: {self.n} actor(s) of one CPU each did not start within "
                               f"{ACTOR_START_TIMEOUT_S} s; free CPUs now: "
                               f"{ray.available_resources().get('CPU', 0):g} (lower resources.actors)") from None
        if built[0].get("error"):
            self.close()
            raise ValueError(f"{self}: the actors cannot rebuild the trial's model {self.spec} "
                             f"({built[0]['error']}); evaluate it in process: resources.actors = 0")
        self._architecture = built[0]["repr"]

    def _bind(self, model: nn.Module) -> None:
        """Check `model` is the module the actors rebuilt and send them its state, once per trial."""
        if model is self._model:
            return
        if self._model is not None:
            raise ValueError(f"{self} evaluates one module per trial; this call passed another one")
        self._start()
        if repr(model) != self._architecture:
            raise ValueError(f"{self}: the evaluated {type(model).__name__} is not the model the actors built from "
                             f"the trial's spec {self.spec}; evaluate it in process: resources.actors = 0")
        state = _safetensors(model.state_dict())
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        self.ray.get([a.load.remote(state, frozen) for a in self.actors])
        self._model = model

    def _submit(self, request: EvaluationRequest) -> tuple[list[Any], list[int]]:
        """Start every actor on its contiguous slice of the rows: (result refs, rows per actor). Table rows go as
        their offsets, any others as themselves (one safetensors object per actor, written before this returns)."""
        tensors = {"x": request.x, "y": request.y}
        if request.center is not None:
            tensors["center"] = request.center
        if torch.is_tensor(request.sigma):
            tensors["sigma"] = request.sigma
        scale = None if request.sigma is None or torch.is_tensor(request.sigma) else float(request.sigma)
        shared = self.ray.put(_safetensors(tensors))
        options = (scale, request.mirrored, request.chunk_size, request.memory_bytes)
        if request.drawn is not None:
            key = request.drawn.table.recipe.key()
            slices = [s for s in torch.tensor_split(request.drawn.offsets.cpu(), len(self.actors)) if s.numel()]
            refs = [a.evaluate_windows.remote(shared, key, s.tolist(), *options)
                    for a, s in zip(self.actors, slices)]
        else:
            slices = [s for s in torch.tensor_split(request.rows, len(self.actors)) if s.shape[0]]
            parts = [self.ray.put(_safetensors({"rows": s})) for s in slices]
            refs = [a.evaluate_rows.remote(shared, part, *options) for a, part in zip(self.actors, parts)]
        return refs, [len(s) for s in slices]


def _safetensors(tensors: dict[str, Tensor]) -> bytes:
    """`tensors` as safetensors bytes (CPU, contiguous): what crosses to the actors."""
    return save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _merge(parts: list[Tensor], sizes: list[int], mirrored: bool) -> Tensor:
    """Per-actor results back in the in-process order: `[R]`, or `[2R]` with all `+` members first (each actor's
    part is its own `+` rows, then its `-` rows)."""
    if not mirrored:
        return torch.cat(parts)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)] + [p[n:] for p, n in zip(parts, sizes)])


class Evaluator:
    """The actor: the trial's model built from its spec, noise tables rebuilt from their recipes."""

    def __init__(self, spec: str, input_shape: tuple[int, ...], n_classes: int):
        torch.set_num_threads(1)  # one CPU per actor (its Ray resource)
        self.tables: dict[str, NoiseTable] = {}
        try:  # a factory model whose module this process cannot import is reported by `ready`, not a crash
            self.model, self.error = models.build(json.loads(spec), tuple(input_shape), n_classes), ""
        except Exception as exc:
            self.model, self.error = None, f"{type(exc).__name__}: {exc}"

    def ready(self) -> dict[str, str]:
        return {"error": self.error} if self.error else {"repr": repr(self.model)}

    def load(self, state: bytes, frozen: list[str]) -> None:
        self.model.load_state_dict(load_tensors(state))
        for name in frozen:
            self.model.get_parameter(name).requires_grad_(False)

    def add_table(self, key: str, state: bytes, size: int, n_params: int) -> None:
        if key not in self.tables:
            self.tables[key] = TableRecipe(state, "cpu", size, n_params).build()

    def evaluate_windows(self, shared: bytes, key: str, offsets: list[int], scale: float | None, mirrored: bool,
                         chunk_size: int | None, memory_bytes: int) -> bytes:
        """`evaluate_rows` for the windows of table `key` at `offsets`."""
        rows = self.tables[key].rows(torch.tensor(offsets, dtype=torch.int64))  # [R, n_params]
        return self._evaluate(shared, rows, scale, mirrored, chunk_size, memory_bytes)

    def evaluate_rows(self, shared: bytes, rows: bytes, scale: float | None, mirrored: bool, chunk_size: int | None,
                      memory_bytes: int) -> bytes:
        """Losses and accuracies of this actor's members as safetensors bytes (`[2R]` or `[R]` each), for the rows
        `[R, n_params]` sent as safetensors bytes."""
        return self._evaluate(shared, load_tensors(rows)["rows"], scale, mirrored, chunk_size, memory_bytes)

    def _evaluate(self, shared: bytes, rows: Tensor, scale: float | None, mirrored: bool, chunk_size: int | None,
                  memory_bytes: int) -> bytes:
        # The same learnbench.population call the driver would have made, on this actor's slice of the rows.
        tensors, options = load_tensors(shared), {"chunk_size": chunk_size, "memory_bytes": memory_bytes}
        x, y = tensors["x"], tensors["y"]
        if "center" not in tensors:  # `rows` are the members
            loss, accuracy = population.evaluate(self.model, rows, x, y, **options)
        else:
            sigma = tensors["sigma"] if scale is None else scale
            evaluate = population.evaluate_mirrored if mirrored else population.evaluate_perturbed
            loss, accuracy = evaluate(self.model, tensors["center"], rows, sigma, x, y, **options)
        return save_tensors({"loss": loss.contiguous(), "accuracy": accuracy.contiguous()})
