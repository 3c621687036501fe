"""Population generations evaluated on Ray actors (the run resource `resources.actors = N`): the same means, losses
and declared FLOPs as in process, whether the rows travel as noise-table offsets (openai-es, snes) or as themselves
(cma-es and ga's population matrices, fresh normals with noise_table = 0), `actors` outside the trial id, the
trainers with one code path, and a trial run through `--executor ray` whose actors share its placement group. One
local Ray instance serves the module."""

from __future__ import annotations

import ast
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import local_ray, make_trials, needs_ray
from learnbench import population, population_backend, population_ray
from learnbench.algorithms import openai_es, snes
from learnbench.algorithms.cma_es import CMAES
from learnbench.algorithms.genetic import GeneticAlgorithm
from learnbench.algorithms.openai_es import OpenAIES
from learnbench.algorithms.snes import SNES
from learnbench.cli import main
from learnbench.errors import UsageError
from learnbench.models import build
from learnbench.noise import NoiseTable
from learnbench.runner import run_trial
from learnbench.spec import Batch, TaskInfo
from learnbench.store import Store

TASK = TaskInfo((1, 28, 28), 10, 64, torch.device("cpu"))


@pytest.fixture(scope="module")
def ray_instance():
    yield from local_ray(3)  # the executor test's trial task holds one CPU, its two actors one each


def batches(n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(7)
    x = torch.rand(n, 64, 1, 28, 28, generator=g)
    x[x < 0.5] = 0  # MNIST-like: many exact zeros (the mlp path skips always-zero pixels)
    return [Batch(x[i], torch.randint(0, 10, (64,), generator=g)) for i in range(n)]


def train(trainer, spec: dict, steps: int) -> tuple[torch.Tensor, list[float], float]:
    """The mean after `steps` generations, their losses, and the FLOPs they declared outside the model."""
    torch.manual_seed(1)
    model = build(spec, TASK.input_shape, TASK.n_classes)
    trainer.setup(model, TASK, torch.Generator().manual_seed(3))
    stats = [trainer.step(b) for b in batches(steps)]
    mean = torch.nn.utils.parameters_to_vector(trainer.eval_model().parameters()).detach().clone()
    return mean, [float(s.loss) for s in stats], sum(s.extra_flops for s in stats)


MLP = {"kind": "mlp", "hidden": [16]}
CASES = {  # id -> (trainer class, hyper-parameters, model, rows sent as offsets (else as themselves))
    "openai-es-cnn": (OpenAIES, {"popsize": 24, "batch_size": 64, "noise_table": 2**20}, {"kind": "cnn"}, True),
    "snes-cnn": (SNES, {"popsize": 12, "batch_size": 64, "noise_table": 2**20}, {"kind": "cnn"}, True),
    "snes-antithetic-mlp": (SNES, {"popsize": 12, "batch_size": 64, "noise_table": 2**20, "antithetic": True}, MLP,
                            True),
    "openai-es-fresh-mlp": (OpenAIES, {"popsize": 24, "batch_size": 64, "noise_table": 0}, MLP, False),
    "snes-fresh-cnn": (SNES, {"popsize": 12, "batch_size": 64, "noise_table": 0}, {"kind": "cnn"}, False),
    "cma-es-cnn": (CMAES, {"popsize": 12, "batch_size": 64}, {"kind": "cnn"}, False),
    "ga-mlp": (GeneticAlgorithm, {"popsize": 12, "batch_size": 64, "candidates": 3}, MLP, False),
}


@pytest.mark.slow
@needs_ray
@pytest.mark.parametrize("case", CASES)
def test_actors_give_the_same_means_and_flops_as_in_process(ray_instance, case, monkeypatch):
    cls, hparams, spec, offsets = CASES[case]
    local_mean, local_losses, local_flops = train(cls(**hparams), spec, 3)
    calls = []
    evaluate = population_ray.ActorBackend.evaluate
    monkeypatch.setattr(population_ray.ActorBackend, "evaluate", lambda self, request: calls.append(
        (len(self.actors), request.drawn is not None)) or evaluate(self, request))
    with population_ray.ActorBackend(2, spec, TASK) as backend, population_backend.evaluated_by(backend):
        remote_mean, remote_losses, remote_flops = train(cls(**hparams), spec, 3)
    # every evaluation went to the 2 actors (the ga's re-scoring of its candidates too), which are gone with the
    # block; the work declared outside the model is the same
    assert len(calls) >= 3 and set(calls) == {(2, offsets)} and backend.actors == []
    assert remote_flops == local_flops > 0
    assert remote_losses == pytest.approx(local_losses, rel=1e-6)
    torch.testing.assert_close(remote_mean, local_mean, rtol=1e-6, atol=1e-7)
    assert not torch.equal(local_mean, torch.nn.utils.parameters_to_vector(build(spec, (1, 28, 28), 10).parameters()))


@pytest.mark.slow
@needs_ray
def test_explicit_rows_are_split_across_actors_and_sent_once(ray_instance):
    """A population matrix goes out as each actor's contiguous slice of rows (fewer rows than actors: the idle
    actor gets none), and the caller may overwrite its tensor once the call has returned."""
    torch.manual_seed(0)
    model = build(MLP, TASK.input_shape, TASK.n_classes)
    center = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    batch = batches(1)[0]
    with population_ray.ActorBackend(3, MLP, TASK) as backend:
        for members in (5, 2):
            pop = center + 0.1 * torch.randn(members, center.numel())
            local = population.evaluate(model, pop, batch.x, batch.y)
            with population_backend.evaluated_by(backend):
                remote = population.evaluate(model, pop, batch.x, batch.y, chunk_size=1)
            for a, b in zip(remote, local):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        noise = torch.randn(4, center.numel())
        local = population.evaluate_mirrored(model, center, noise, 0.05, batch.x, batch.y)
        with population_backend.evaluated_by(backend):
            remote = population.evaluate_mirrored(model, center, noise, 0.05, batch.x, batch.y)
        noise.zero_()  # after the call: what the actors evaluated was sent before it returned
        for a, b in zip(remote, local):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@needs_ray
def test_actors_start_in_setup_off_the_clock_table_or_not(ray_instance):
    with population_ray.ActorBackend(1, MLP, TASK) as backend, population_backend.evaluated_by(backend):
        for trainer in (CMAES(popsize=8), OpenAIES(popsize=4, noise_table=0)):
            backend.close()
            trainer.setup(build(MLP, TASK.input_shape, 10), TASK, torch.Generator())  # flattens the model
            assert len(backend.actors) == 1


@pytest.mark.slow
@needs_ray
def test_table_rows_changed_after_sampling_are_refused(ray_instance):
    model, batch = build(MLP, TASK.input_shape, TASK.n_classes), batches(1)[0]
    center = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    with population_ray.ActorBackend(1, MLP, TASK) as backend, population_backend.evaluated_by(backend):
        noise = NoiseTable(torch.Generator().manual_seed(0), 2**16, center.numel(), center.device).sample(2)
        noise[0, 0] += 1.0  # still named by its offsets, but the actors would evaluate the table's window
        with pytest.raises(ValueError, match="noise tensor was changed after NoiseTable.sample"):
            population.evaluate_mirrored(model, center, noise, 0.02, batch.x, batch.y)


def es_trial(entry: dict, actors: int, spec: dict | None = None):
    return make_trials({"models": [spec or {"kind": "mlp", "hidden": [16]}], "budget": {"steps": 4},
                        "eval": {"points": 0}, "resources": {"actors": actors},
                        "algorithms": [{"batch_size": 32, **entry}]})[0]


@pytest.mark.slow
@needs_ray
def test_the_runner_installs_actors_and_kills_them_when_the_trial_ends(ray_instance):
    entry = {"id": "snes", "popsize": 8, "noise_table": 2**16}
    local, remote = run_trial(es_trial(entry, 0), None), run_trial(es_trial(entry, 2), None)
    assert local.status == remote.status == "done", remote.error
    for name in ("test/accuracy", "test/loss", "val/loss", "cost/forward_passes", "cost/flops"):
        assert remote.metrics[name] == pytest.approx(local.metrics[name], rel=1e-6), name
    deadline = time.monotonic() + 30  # killed actors hand their CPUs back asynchronously
    while ray_instance.available_resources().get("CPU", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_instance.available_resources().get("CPU", 0) == 3


@needs_ray
@pytest.mark.parametrize("entry", [{"id": "cma-es", "popsize": 8}, {"id": "ga", "popsize": 8, "candidates": 2},
                                   {"id": "openai-es", "popsize": 8, "noise_table": 0}],
                         ids=["cma-es", "ga", "fresh-normals"])
@pytest.mark.slow
def test_population_matrices_and_fresh_noise_run_on_actors_in_a_trial(ray_instance, entry, monkeypatch):
    # one suite can now hold openai-es and cma-es under the same `[resources] actors`: every trainer's call is served
    served = []
    evaluate = population_ray.ActorBackend.evaluate
    monkeypatch.setattr(population_ray.ActorBackend, "evaluate",
                        lambda self, request: served.append(request.drawn is None) or evaluate(self, request))
    local, remote = run_trial(es_trial(entry, 0), None), run_trial(es_trial(entry, 2), None)
    assert local.status == remote.status == "done", remote.error
    assert len(served) >= 4 and all(served)  # 4 generations, every one sent as rows
    for name in ("test/accuracy", "test/loss", "val/loss", "cost/forward_passes", "cost/flops"):
        assert remote.metrics[name] == pytest.approx(local.metrics[name], rel=1e-6), name


@pytest.mark.slow
@needs_ray
def test_actors_need_cpu_and_refuse_models_they_cannot_rebuild(ray_instance, tmp_path, monkeypatch):
    spec = {"kind": "mlp", "hidden": [8]}
    with pytest.raises(ValueError, match="device cpu"):
        population_ray.ActorBackend(2, spec, TaskInfo((1, 28, 28), 10, 64, torch.device("cuda")))
    with population_ray.ActorBackend(1, spec, TASK) as backend, population_backend.evaluated_by(backend):
        trainer = OpenAIES(popsize=4, batch_size=64, noise_table=2**16)
        trainer.setup(build({"kind": "mlp", "hidden": [9]}, TASK.input_shape, 10), TASK, torch.Generator())
        with pytest.raises(ValueError, match="not the model the actors built"):
            trainer.step(batches(1)[0])
    # a factory the driver imports but the actors cannot (its folder is on this process's path only)
    (tmp_path / "driver_only_models.py").write_text(textwrap.dedent("""
        import torch
        def tiny(input_shape, n_classes):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, n_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = {"kind": "factory", "factory": "driver_only_models:tiny"}
    with population_ray.ActorBackend(1, factory, TASK) as backend, population_backend.evaluated_by(backend):
        for trainer in (OpenAIES(noise_table=2**16), CMAES()):  # at setup, off the clock, table or not
            with pytest.raises(ValueError, match="actors cannot rebuild the trial's model.*driver_only_models"):
                trainer.setup(build(factory, TASK.input_shape, 10), TASK, torch.Generator())


def test_missing_ray_is_a_clear_error_at_trial_start(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ValueError, match=r"Ray is not installed: pip install 'learnbench\[ray\]'"):
        population_ray.ActorBackend(2, {"kind": "mlp", "hidden": [8]}, TASK)
    result = run_trial(es_trial({"id": "openai-es", "popsize": 8, "noise_table": 2**16}, 2), None)
    assert result.status == "failed" and "Ray is not installed" in result.error


def test_actors_are_not_part_of_the_trial_id():
    entry = {"id": "openai-es", "popsize": 8, "batch_size": 32}
    ids = [make_trials({"algorithms": [entry], "resources": {"actors": n}})[0].id for n in (0, 2)]
    assert ids[0] == ids[1] == make_trials({"algorithms": [entry]})[0].id
    other = make_trials({"algorithms": [{**entry, "popsize": 10}]})[0].id
    assert other != ids[0]
    with pytest.raises(UsageError, match="workers"):  # no longer a hyper-parameter
        make_trials({"algorithms": [{**entry, "workers": 2}]})
    with pytest.raises(UsageError, match="actors must be a non-negative integer"):
        make_trials({"algorithms": [entry], "resources": {"actors": -1}})


@pytest.mark.parametrize("module", [openai_es, snes], ids=["openai-es", "snes"])
def test_es_trainers_have_one_code_path_without_ray(module):
    """Where members are evaluated is the runner's business: no import, name or attribute of Ray, pools or
    workers in the code (docstrings may describe the run resource)."""
    tree = ast.parse(Path(module.__file__).read_text())
    names = [node.id for node in ast.walk(tree) if isinstance(node, ast.Name)]
    names += [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    names += [a.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names]
    names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    names += [node.target.id for node in ast.walk(tree) if isinstance(node, ast.AnnAssign)
              and isinstance(node.target, ast.Name)]
    assert "evaluate_mirrored" in names
    words = {"ray", "pool", "pools", "pool_for", "worker", "workers", "actor", "actors"}
    bad = sorted({n for n in names if words & set(re.split(r"[._]", n.lower()))})
    assert bad == [], bad


@pytest.mark.slow
@needs_ray
def test_a_trial_with_actors_runs_through_the_ray_executor(ray_instance, tmp_path, tiny_suite):
    common = ["--algorithms", "openai-es", "--set", "openai-es.popsize=16", "--set", "openai-es.batch_size=32",
              "--set", "openai-es.noise_table=65536", "--set", "budget.steps=6", "--quiet"]
    assert main(["run", str(tiny_suite), *common, "--out", str(tmp_path / "local"), "--workers", "1"]) == 0
    assert main(["run", str(tiny_suite), *common, "--set", "resources.actors=2", "--set", "resources.cpus=1",
                 "--executor", "ray", "--out", str(tmp_path / "ray")]) == 0
    (local,), (remote,) = Store.open(tmp_path / "local").trials(), Store.open(tmp_path / "ray").trials()
    assert remote.status == "done" and remote.resources["actors"] == 2
    assert remote.id == local.id
    for name in ("test/accuracy", "test/loss", "cost/forward_passes", "cost/flops"):
        assert remote.metrics[name] == pytest.approx(local.metrics[name], rel=1e-6), name
    assert remote.metrics["cost/forward_passes"] == 6 * 16 * 32
    from ray.util import placement_group_table

    assert all(g["state"] == "REMOVED" for g in placement_group_table().values())


@pytest.mark.slow
@needs_ray
def test_a_trial_whose_actors_the_cluster_cannot_hold_is_a_usage_error(ray_instance, tmp_path, tiny_suite, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tiny_suite), "--algorithms", "openai-es", "--set", "resources.actors=8",
                 "--executor", "ray", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one per actor (resources.actors=8)" in err[0], err
    assert not out.exists()
