"""The Ray executor: the same trials and metrics as the local executor, a killed worker fails only its trial, results
are recorded as tasks finish, and resources/usage errors. One local Ray instance serves the whole module."""

from __future__ import annotations

import sys
import textwrap
import threading
import time

from dataclasses import replace

import pytest
import torch

from conftest import TINY_SUITE
from helpers import local_ray, make_trials, needs_ray
from learnbench import config, load_model
from learnbench.cli import main
from learnbench.errors import UsageError
from learnbench.executor import run_local
from learnbench.store import Store

VARY = ("cost/train_seconds", "cost/peak_memory_bytes", "cost/eval_seconds", "robust/seconds")

PLUGIN = '''
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from learnbench.algorithms.backprop import Backprop

KILL_MARKER = Path({kill!r})
RELEASE = Path({release!r})


@dataclass(eq=False)
class KillsWorker(Backprop):
    """SIGKILLs its own process in step 3 while KILL_MARKER exists (a crash, an OOM kill, a preempted node)."""
    name: ClassVar[str] = "kills-worker"

    def step(self, batch):
        self._count = getattr(self, "_count", 0) + 1
        if self._count == 3 and KILL_MARKER.exists():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(batch)


@dataclass(eq=False)
class WaitsForRelease(Backprop):
    """Holds its first step until RELEASE exists (at most a minute)."""
    name: ClassVar[str] = "waits"

    def step(self, batch):
        deadline = time.monotonic() + 60
        while not RELEASE.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().step(batch)
'''


class RecordingView:
    """A ProgressView that remembers the order of its calls."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def start(self, trial):
        self.events.append(("start", trial.id))

    def update(self, trial_id, fraction, loss=None):
        self.events.append(("update", trial_id))

    def finish(self, trial, status, result=None):
        self.events.append(("finish", trial.id))

    def close(self):
        pass


@pytest.fixture(scope="module")
def ray_instance():
    yield from local_ray(2)


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "ray_plugin.py"
    path.write_text(PLUGIN.format(kill=str(tmp_path / "kill"), release=str(tmp_path / "release")))
    return path


def _comparable(store: Store) -> dict:
    out = {}
    for t in store.trials():
        curves = [(c.step, c.examples, c.flops, c.metric, c.value) for c in store.curves(t.id).get(t.id, [])]
        metrics = {k: v for k, v in t.metrics.items() if k not in VARY}
        out[t.id] = (t.status, metrics, sorted(curves, key=lambda c: (c[0], c[3])))
    return out


@pytest.mark.slow
@needs_ray
def test_same_trials_metrics_and_weights_as_the_local_executor(ray_instance, tmp_path):
    from learnbench.executor_ray import run_ray

    suite = {"seeds": 2, "budget": {"steps": 50},
             "algorithms": [{"id": "backprop", "batch_size": 32},
                            {"id": "backprop", "label": "sgd", "optimizer": "momentum", "lr": 0.05, "batch_size": 32}]}
    trials = make_trials(suite)
    threads = torch.get_num_threads()
    stores, views = {}, {}
    for name in ("local", "ray"):
        (tmp_path / name).mkdir()
        stores[name] = Store(tmp_path / name)
        stores[name].add_trials(trials)
        views[name] = RecordingView()
    try:
        run_local(trials, stores["local"], str(tmp_path / "local"), None, 1, 1, views["local"])
    finally:
        torch.set_num_threads(threads)
    run_ray(trials, stores["ray"], str(tmp_path / "ray"), None, 1, views["ray"])

    local, remote = _comparable(stores["local"]), _comparable(stores["ray"])
    assert set(local) == set(remote) == {t.id for t in trials}
    for trial_id, (status, metrics, curves) in local.items():
        r_status, r_metrics, r_curves = remote[trial_id]
        assert status == r_status == "done"
        assert r_metrics.keys() == metrics.keys()
        assert r_metrics == {k: pytest.approx(v, rel=1e-6, abs=1e-9) for k, v in metrics.items()}
        assert [c[:4] for c in r_curves] == [c[:4] for c in curves]
        assert [c[4] for c in r_curves] == pytest.approx([c[4] for c in curves], rel=1e-6, abs=1e-9)
        # weights: what the task sent back and the driver wrote, against what a local worker wrote
        a, b = load_model(tmp_path / "local", trial_id), load_model(tmp_path / "ray", trial_id)
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-7), name
    events = views["ray"].events
    for t in trials:
        kinds = [k for k, i in events if i == t.id]
        assert kinds[0] == "start" and kinds[-1] == "finish" and kinds.count("start") == kinds.count("finish") == 1
    assert {r.provenance["threads"] for r in stores["ray"].trials()} == {1}


@needs_ray
def test_each_result_is_recorded_when_its_task_finishes(ray_instance, tmp_path, plugin):
    from learnbench.executor_ray import run_ray

    trials = make_trials({"algorithms": [{"id": "waits", "batch_size": 32}, {"id": "backprop", "batch_size": 32}]},
                         plugin_files=[plugin])
    waits, quick = trials
    Store(tmp_path).add_trials(trials)
    errors = []

    def drive():
        try:
            store = Store(tmp_path)
            run_ray(trials, store, str(tmp_path), None, 1, RecordingView())
            store.close()
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)

    driver = threading.Thread(target=drive)
    driver.start()
    reader = Store.open(tmp_path)
    deadline = time.monotonic() + 60
    while reader.statuses()[quick.id] != "done" and time.monotonic() < deadline:
        time.sleep(0.1)
    # the held trial's start reaches the driver through the progress actor, maybe after the other one finished
    while reader.statuses()[waits.id] != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    seen = reader.statuses()
    (tmp_path / "release").touch()
    driver.join(timeout=120)
    assert not errors, errors
    assert seen[quick.id] == "done" and seen[waits.id] == "running", seen
    assert set(reader.statuses().values()) == {"done"}
    reader.close()


@needs_ray
def test_resources_no_node_can_hold_is_a_usage_error(ray_instance, tmp_path, capsys):
    out = tmp_path / "out"
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent(TINY_SUITE))
    for setting, match in (("resources.cpus=64", "64 CPU(s)"), ("resources.gpus=1", "1 GPU(s)")):
        assert main(["run", str(suite), "--executor", "ray", "--set", setting, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no node of the Ray cluster" in err[0] and match in err[0], err
        assert not out.exists()


@needs_ray
def test_killed_worker_fails_its_trial_the_rest_finish_and_a_rerun_completes_it(ray_instance, tmp_path, plugin,
                                                                                 capsys):
    suite = tmp_path / "kill.toml"
    suite.write_text(textwrap.dedent(TINY_SUITE) + '\n[[algorithms]]\nid = "kills-worker"\nbatch_size = 32\n')
    out = tmp_path / "run"
    argv = ["run", str(suite), "--plugin", str(plugin), "--executor", "ray", "--out", str(out), "--quiet"]
    (tmp_path / "kill").touch()
    assert main(argv) == 1, capsys.readouterr().err
    store = Store.open(out)
    first = {t.id: t for t in store.trials()}
    store.close()
    killed = [t for t in first.values() if t.algorithm == "kills-worker"]
    assert len(first) == 2 and len(killed) == 1
    assert all(t.status == "failed" and "worker process died" in t.error and "WorkerCrashedError" in t.error
               for t in killed)
    assert all(t.status == "done" for t in first.values() if t.algorithm == "backprop")

    (tmp_path / "kill").unlink()  # the "fix": the same plugin file, so the same trial ids
    assert main(argv) == 0
    assert "(1 already finished)" in capsys.readouterr().err
    store = Store.open(out)
    second = {t.id: t for t in store.trials()}
    store.close()
    assert second.keys() == first.keys() and all(t.status == "done" for t in second.values())
    assert all(second[i].finished == t.finished for i, t in first.items() if t.status == "done")
    assert {p.name for p in (out / "models").iterdir()} == {f"{i}.{ext}" for i in first for ext in ("json", "safetensors")}


def test_missing_ray_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent(TINY_SUITE))
    out = tmp_path / "out"
    assert main(["run", str(suite), "--executor", "ray", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["learnbench: error: --executor ray needs Ray, which is not installed: pip install 'learnbench[ray]'"]
    assert not out.exists()


def test_address_without_ray_executor_and_unreachable_head(tmp_path, capsys):
    from learnbench.executor_ray import _check_reachable

    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent(TINY_SUITE))
    assert main(["run", str(suite), "--address", "auto", "--out", str(tmp_path / "o")]) == 2
    assert "--address needs --executor ray" in capsys.readouterr().err
    with pytest.raises(UsageError, match="no Ray head answers"):
        _check_reachable("127.0.0.1:1")
    with pytest.raises(UsageError, match="expected auto"):
        _check_reachable("somewhere")


def test_resources_table_validation_and_trial_ids():
    plain = make_trials({})
    placed = make_trials({"resources": {"cpus": 2, "gpus": 0.5, "actors": 4}})
    assert placed[0].resources == {"cpus": 2, "gpus": 0.5, "actors": 4, "data_parallel": 1}
    assert plain[0].resources == {"cpus": None, "gpus": None, "actors": 0, "data_parallel": 1}  # 0 actors: evaluated in process
    assert [t.id for t in placed] == [t.id for t in plain]  # where a trial runs is not what it is
    assert make_trials({}, sets=["resources.cpus=3"])[0].resources["cpus"] == 3
    assert make_trials({}, sets=["resources.actors=2"])[0].resources["actors"] == 2
    for bad, match in (({"threads": 2}, "unknown key"), ({"cpus": 0}, "positive"), ({"gpus": -1}, "non-negative"),
                       ({"cpus": "two"}, "positive"), ({"actors": -1}, "non-negative integer"),
                       ({"actors": 1.5}, "non-negative integer")):
        with pytest.raises(UsageError, match=match):
            make_trials({"resources": bad})
    with pytest.raises(UsageError, match="unknown key"):
        make_trials({}, sets=["resources.memory=4"])


def test_task_resources_defaults():
    from learnbench.executor_ray import task_resources

    trial = make_trials({})[0]
    node = {"CPU": 8.0, "GPU": 2.0}
    assert task_resources(trial, 2, node) == (2.0, 0.0)  # the executor's threads per trial
    assert task_resources(trial, 32, node) == (8.0, 0.0)  # at most a whole node
    assert task_resources(replace(trial, device="cuda"), 16, node) == (1.0, 1.0)
    assert task_resources(replace(trial, resources={"cpus": 0.5, "gpus": 0.25}), 4, node) == (0.5, 0.25)
    assert config.trial_id({**trial.config(), "resources": {"cpus": 7, "gpus": 1, "actors": 3}}) == trial.id
