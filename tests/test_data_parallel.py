"""Data-parallel backprop (issue 23, item 3): two processes on half-batches end where one process on the whole batch
ends; a killed helper fails the trial cleanly; the suite checks; the same trial through Ray Train."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from helpers import HAS_RAY
from learnbench import config
from learnbench.errors import UsageError
from learnbench.registry import discover
from learnbench.runner import run_trial

SUITE = {"name": "dp", "datasets": ["digits"], "seeds": 1, "models": [{"kind": "mlp", "hidden": [32]}],
         "budget": {"steps": 6}, "eval": {"points": 2}, "robustness": {"examples": 0},
         "algorithms": [{"id": "backprop", "batch_size": 64, "optimizer": "momentum"}]}


def trials(**entry) -> list:
    suite = {**SUITE, "algorithms": [{**SUITE["algorithms"][0], **entry}]}
    return config.resolve(suite, discover(), "cpu", "test")


def weights(run_dir: Path, trial_id: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "models" / f"{trial_id}.safetensors"))


@pytest.mark.slow
def test_two_processes_on_half_batches_match_one_process_on_the_whole(tmp_path: Path) -> None:
    """DDP averages the two shards' gradients: after 6 momentum-SGD steps the parameters equal one process's on
    the whole batch of 64 (same seed, gloo) to 1e-5; the cost counts both processes."""
    one, two = trials()[0], trials(data_parallel=2)[0]
    assert one.id != two.id and two.data_parallel == 2 and "data_parallel" not in one.config()
    single = run_trial(one, str(tmp_path / "one"))
    parallel = run_trial(two, str(tmp_path / "two"))
    assert single.status == parallel.status == "done", parallel.error
    a, b = weights(tmp_path / "one", one.id), weights(tmp_path / "two", two.id)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0)
    assert parallel.metrics["cost/examples"] == single.metrics["cost/examples"] == 6 * 64
    # the optimizer's update runs in both processes: its declared FLOPs count twice
    assert parallel.metrics["cost/flops"] > single.metrics["cost/flops"]
    assert parallel.metrics["cost/processes"] == 2


@pytest.mark.slow
def test_a_killed_helper_fails_the_trial_cleanly(tmp_path: Path) -> None:
    suite = dict(SUITE, budget={"time_s": 120},
                 algorithms=[{"id": "backprop", "batch_size": 64, "data_parallel": 2}])
    (tmp_path / "suite.toml").write_text(_toml(suite))
    run_dir = tmp_path / "run"
    import subprocess
    import sys

    cli = subprocess.Popen([sys.executable, "-m", "learnbench.cli", "run", str(tmp_path / "suite.toml"), "--out",
                            str(run_dir), "--workers", "1", "--quiet"], stderr=subprocess.PIPE, text=True)
    helper = None
    deadline = time.monotonic() + 60
    while helper is None and time.monotonic() < deadline:
        helper = _helper_of(cli.pid)
        time.sleep(0.2)
    assert helper is not None, "no helper process appeared"
    ready = _ready_file_of(helper)
    while not ready.exists() and time.monotonic() < deadline + 60:  # started: it joins the group now
        time.sleep(0.2)
    time.sleep(2)  # let it step a little
    os.kill(helper, signal.SIGKILL)
    try:
        _, stderr = cli.communicate(timeout=120)
    finally:
        cli.kill()  # never leave the run behind (a no-op once it has ended)
    assert cli.returncode == 1, stderr
    shown = json.loads(run_cli("show", str(run_dir), "--json").stdout)
    [trial] = shown["trials"]
    assert trial["status"] == "failed" and "Connection closed by peer" in trial["error"], trial["error"]
    assert not (run_dir / "models").exists()  # no weights of a failed trial
    assert _helper_of(cli.pid) is None


def _ready_file_of(helper: int) -> Path:
    command = Path(f"/proc/{helper}/cmdline").read_bytes().decode().split("\0")
    return Path(command[command.index("--ready") + 1])


def test_a_helper_that_dies_while_starting_fails_at_once(tmp_path: Path) -> None:
    """Rank 0 waits for its helpers' ready files, not for the group's whole timeout: a helper that exits before
    (here at once, with a message) raises within seconds, naming its code and its last stderr line; helpers that
    start let it through."""
    import subprocess
    import sys

    from learnbench.data_parallel import wait_until_ready

    touch = "import pathlib, sys; pathlib.Path(sys.argv[1]).touch()"
    fail = "import sys; sys.stderr.write('warming up\\nno such dataset\\n'); sys.exit(3)"
    ready = [tmp_path / "ready-1", tmp_path / "ready-2"]
    started = [subprocess.Popen([sys.executable, "-c", touch, str(path)], stderr=subprocess.PIPE) for path in ready]
    wait_until_ready(started, ready, timeout=60)
    for helper in started:
        helper.wait()
    dying = subprocess.Popen([sys.executable, "-c", fail], stderr=subprocess.PIPE)
    begin = time.monotonic()
    with pytest.raises(RuntimeError, match="helper rank 1 exited with code 3 before joining the group: no such data"):
        wait_until_ready([dying], [tmp_path / "never"], timeout=60)
    assert time.monotonic() - begin < 30
    dying.stderr.close()


def _helper_of(parent: int) -> int | None:
    """The pid of a `learnbench.data_parallel` helper started by process `parent`, if any."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"learnbench.data_parallel" in command and str(parent).encode() in command:
            return int(entry.name)
    return None


def _toml(suite: dict) -> str:
    lines = [f'name = "{suite["name"]}"', f'datasets = {json.dumps(suite["datasets"])}', f'seeds = {suite["seeds"]}',
             "[[models]]", 'kind = "mlp"', "hidden = [32]", "[budget]"]
    lines += [f"{k} = {v}" for k, v in suite["budget"].items()]
    lines += ["[robustness]", "examples = 0"]
    for entry in suite["algorithms"]:
        lines.append("[[algorithms]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("entry, message", [
    ({"optimizer": "kfac", "data_parallel": 2}, "does not run data-parallel"),
    ({"optimizer": "lbfgs", "data_parallel": 2}, "does not run data-parallel"),
    ({"id": "fa", "data_parallel": 2}, "does not run data-parallel"),
    ({"batch_size": 63, "data_parallel": 2}, "does not split into 2 equal shards"),
    ({"data_parallel": 0}, "whole number of processes"),
])
def test_data_parallel_is_checked_before_the_run(entry: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        trials(**entry)


def test_suite_wide_data_parallel_and_the_trial_id() -> None:
    suite = {**SUITE, "resources": {"data_parallel": 2}}
    [trial] = config.resolve(suite, discover(), "cpu", "test")
    assert trial.data_parallel == 2 and trial.id == trials(data_parallel=2)[0].id
    assert trials()[0].id == replace(trials()[0]).id  # one process: the config (and id) it had before


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'learnbench[ray]')")
def test_the_same_trial_through_ray_train(tmp_path: Path) -> None:
    (tmp_path / "suite.toml").write_text(_toml(dict(SUITE, algorithms=[
        {"id": "backprop", "batch_size": 64, "optimizer": "momentum", "data_parallel": 2}])))
    done = run_cli("run", str(tmp_path / "suite.toml"), "--out", str(tmp_path / "ray"), "--executor", "ray",
                   "--quiet", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [trial] = json.loads(run_cli("show", str(tmp_path / "ray"), "--json").stdout)["trials"]
    same = trials(data_parallel=2)[0]  # its id differs (code version "test"), not its experiment
    local = run_trial(same, str(tmp_path / "local"))
    assert trial["status"] == "done" and trial["metrics"]["cost/processes"] == 2
    a, b = weights(tmp_path / "local", same.id), weights(tmp_path / "ray", trial["id"])
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0)
    assert trial["metrics"]["test/accuracy"] == local.metrics["test/accuracy"]
