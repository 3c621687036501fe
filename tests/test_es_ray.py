"""ES generations spread over Ray actors (`workers = N`): the same means and declared FLOPs as in process,
`workers` outside the trial id, and a trial run through `--executor ray` whose actors share its placement group.
One local Ray instance serves the module."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import local_ray, make_trials, needs_ray
from learnbench import population_ray
from learnbench.algorithms.openai_es import OpenAIES
from learnbench.algorithms.snes import SNES
from learnbench.cli import main
from learnbench.models import build
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


CASES = [  # (trainer class, hyper-parameters, model)
    (OpenAIES, {"popsize": 24, "batch_size": 64, "noise_table": 2**20}, {"kind": "cnn"}),
    (SNES, {"popsize": 12, "batch_size": 64, "noise_table": 2**20}, {"kind": "cnn"}),
    (SNES, {"popsize": 12, "batch_size": 64, "noise_table": 2**20, "antithetic": True}, {"kind": "mlp", "hidden": [16]}),
]


@needs_ray
@pytest.mark.parametrize("cls, hparams, spec", CASES, ids=["openai-es-cnn", "snes-cnn", "snes-antithetic-mlp"])
def test_workers_give_the_same_means_and_flops_as_in_process(ray_instance, cls, hparams, spec, monkeypatch):
    local_mean, local_losses, local_flops = train(cls(**hparams), spec, 3)
    remote = cls(**hparams, workers=2)
    calls = []
    submit = population_ray.Pool.submit
    monkeypatch.setattr(population_ray.Pool, "submit", lambda self, *a, **k: calls.append(1) or submit(self, *a, **k))
    remote_mean, remote_losses, remote_flops = train(remote, spec, 3)
    # every generation went to the 2 actors; the work declared outside the model is the same (at least the 2 P n
    # FLOPs of building the members, whoever builds them)
    assert len(calls) == 3 and len(remote._pool.actors) == 2
    assert remote_flops == local_flops >= 3 * 2 * hparams["popsize"] * remote._mean.numel()
    assert remote_losses == pytest.approx(local_losses, rel=1e-6)
    torch.testing.assert_close(remote_mean, local_mean, rtol=1e-6, atol=1e-7)
    assert not torch.equal(local_mean, torch.nn.utils.parameters_to_vector(build(spec, (1, 28, 28), 10).parameters()))


def test_workers_is_validated_and_needs_cpu_and_a_noise_table():
    model = build({"kind": "mlp", "hidden": [8]}, (1, 28, 28), 10)
    with pytest.raises(ValueError, match="workers"):
        OpenAIES(workers=-1).setup(model, TASK, torch.Generator())
    with pytest.raises(ValueError, match="noise table"):
        SNES(workers=2, noise_table=0).setup(model, TASK, torch.Generator())


def test_describe_rebuilds_builtin_models_and_refuses_others():
    shapes = {"mlp": (1, 8, 8), "resmlp": (1, 8, 8), "cnn": (1, 8, 8), "lenet": (1, 28, 28)}
    for spec in ({"kind": "mlp", "hidden": [8, 4], "activation": "tanh", "norm": "layer"},
                 {"kind": "resmlp", "hidden": [8, 8]}, {"kind": "cnn", "channels": [4, 8], "norm": "batch"},
                 {"kind": "cnn", "kernel": 3, "activation": "elu"}, {"kind": "lenet", "pool": "max"}):
        model = build(spec, shapes[spec["kind"]], 10)
        described = population_ray.describe(model, shapes[spec["kind"]], 10)
        assert build(described, shapes[spec["kind"]], 10).__repr__() == model.__repr__(), spec
        assert described["kind"] == spec["kind"]
    with pytest.raises(ValueError, match="built-in models"):
        population_ray.describe(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), (1, 8, 8), 10)


def test_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    model = build({"kind": "mlp", "hidden": [8]}, (1, 28, 28), 10)
    with pytest.raises(ValueError, match=r"Ray is not installed: pip install 'learnbench\[ray\]'"):
        OpenAIES(workers=2, noise_table=2**16).setup(model, TASK, torch.Generator())


def test_workers_is_not_part_of_the_trial_id():
    entry = {"id": "openai-es", "popsize": 8, "batch_size": 32}
    ids = [make_trials({"algorithms": [{**entry, "workers": n}]})[0]["id"] for n in (0, 2)]
    assert ids[0] == ids[1]
    other = make_trials({"algorithms": [{**entry, "popsize": 10}]})[0]["id"]
    assert other != ids[0]


@needs_ray
def test_a_trial_with_actors_runs_through_the_ray_executor(ray_instance, tmp_path, tiny_suite):
    common = ["--algorithms", "openai-es", "--set", "openai-es.popsize=16", "--set", "openai-es.batch_size=32",
              "--set", "openai-es.noise_table=65536", "--set", "budget.steps=6", "--quiet"]
    assert main(["run", str(tiny_suite), *common, "--out", str(tmp_path / "local"), "--workers", "1"]) == 0
    assert main(["run", str(tiny_suite), *common, "--set", "openai-es.workers=2", "--set", "resources.cpus=1",
                 "--executor", "ray", "--out", str(tmp_path / "ray")]) == 0
    (local,), (remote,) = Store.open(tmp_path / "local").trials(), Store.open(tmp_path / "ray").trials()
    assert remote["status"] == "done" and remote["config"]["hparams"]["workers"] == 2
    assert remote["id"] == local["id"]
    for name in ("test/accuracy", "test/loss", "cost/forward_passes", "cost/flops"):
        assert remote["metrics"][name] == pytest.approx(local["metrics"][name], rel=1e-6), name
    assert remote["metrics"]["cost/forward_passes"] == 6 * 16 * 32
    from ray.util import placement_group_table

    assert all(g["state"] == "REMOVED" for g in placement_group_table().values())


@needs_ray
def test_a_trial_whose_actors_the_cluster_cannot_hold_is_a_usage_error(ray_instance, tmp_path, tiny_suite, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tiny_suite), "--algorithms", "openai-es", "--set", "openai-es.workers=8",
                 "--executor", "ray", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one per actor (openai-es.workers=8)" in err[0], err
    assert not out.exists()
