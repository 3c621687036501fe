"""Plugins end to end: the example package installed with pip and run, broken plugins of every kind, the runner's
isolation of a misbehaving trainer, the template, and the conformance kit on every built-in trainer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from helpers import make_trials
from learnbench.cli import main
from learnbench.errors import UsageError
from learnbench.executor import ProgressView, run_local
from learnbench.registry import discover, entry_for_class, registered
from learnbench.runner import BATCH_CHECK_EVERY, run_trial
from learnbench.store import Store
from learnbench.testing import CHECKS, check_trainer, parametrize_with_checks
from plugin_cases import BROKEN, DUPLICATE, FAILS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin-random-search"
SUITE = """
name = "plugin-test"
datasets = ["digits"]
seeds = 1
[[models]]
kind = "mlp"
hidden = [16]
[budget]
steps = 30
[eval]
points = 2
[robustness]
examples = 0
[[algorithms]]
id = "random-search"
[[algorithms]]
id = "backprop"
batch_size = 32
"""


# --- the example package, installed as a user would ------------------------------------------------------------

CAN_BUILD_WHEELS = ("from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1\n"
                    "import pip")


def _pip_python() -> str:
    """An interpreter whose pip can build the example without the network: this one (learnbench[test] brings
    setuptools >= 70.1) or, in a --system-site-packages venv whose own setuptools is older, the base one."""
    for python in (sys.executable, str(Path(sys.base_prefix) / "bin" / "python3")):
        if subprocess.run([python, "-c", CAN_BUILD_WHEELS], capture_output=True).returncode == 0:
            return python
    pytest.skip("no interpreter here has pip and setuptools >= 70.1 to build the example offline "
                "(pip install 'learnbench[test]')")


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    """`pip install` of examples/plugin-random-search into a fresh folder (no network: no deps, no isolation)."""
    site = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")  # pip builds in a copy: the source tree stays clean
    subprocess.run(["cp", "-r", str(EXAMPLE), str(build / "src")], check=True)
    out = subprocess.run([_pip_python(), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(build / "src")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (site / "learnbench_random_search" / "random_search.py").is_file()
    return site


def _with_site(site: Path) -> dict:
    return {"PYTHONPATH": str(site), "LEARNBENCH_DISABLE_PLUGIN_AUTOLOAD": ""}


@pytest.mark.slow
def test_installed_example_is_listed_with_its_distribution(example_site):
    out = run_cli("list", "algorithms", env=_with_site(example_site))
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("random-search"))
    assert row.split()[1:3] == ["learnbench-random-search", "0.1.0"], row
    hidden = run_cli("list", "algorithms", env={**_with_site(example_site), "LEARNBENCH_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "random-search" not in hidden.stdout and "backprop" in hidden.stdout


@pytest.mark.slow
def test_installed_example_runs_in_a_suite_and_its_results_are_found(example_site, tmp_path):
    suite, run_dir = tmp_path / "suite.toml", tmp_path / "run"
    suite.write_text(textwrap.dedent(SUITE))
    out = run_cli("run", str(suite), "--out", str(run_dir), "--workers", "1", "--quiet", env=_with_site(example_site))
    assert out.returncode == 0, out.stderr
    shown = json.loads(run_cli("show", str(run_dir), "--json", env=_with_site(example_site)).stdout)
    trial = next(t for t in shown["trials"] if t["algorithm"] == "random-search")
    assert trial["status"] == "done" and trial["hparams"]["sigma"] == 0.02
    assert trial["metrics"]["test/accuracy"] > 0.1 and trial["metrics"]["cost/backward_passes"] == 0
    assert trial["metrics"]["cost/forward_passes"] == 30 * 2 * 256  # two forward passes of the batch per step
    store = Store.open(run_dir)
    provenance = {t.algorithm: t.provenance["plugin"] for t in store.trials()}
    store.close()
    assert provenance["random-search"] == {"distribution": "learnbench-random-search", "version": "0.1.0"}
    assert provenance["backprop"]["distribution"] == "learnbench"


@pytest.mark.slow
def test_installed_example_passes_check_plugin_and_its_own_tests(example_site):
    out = run_cli("check-plugin", "random-search", env=_with_site(example_site))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("PASS ") == len(CHECKS) and "FAIL" not in out.stdout
    own = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                         capture_output=True, text=True, timeout=300, cwd=EXAMPLE,
                         env={**__import__("os").environ, **_with_site(example_site)})
    assert own.returncode == 0, own.stdout[-3000:]
    assert f"{len(CHECKS) + 1} passed" in own.stdout  # one test per check, plus its own reference test


# --- broken entry points and duplicate names ------------------------------------------------------------------

def _dist(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A minimal installed distribution: METADATA, entry_points.txt and its modules, on a folder of sys.path."""
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[learnbench.algorithms]\n{lines}")
    for name, text in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(text))


GOOD_MODULE = '''
from dataclasses import dataclass
from typing import ClassVar
from learnbench.algorithms.backprop import Backprop

@dataclass(eq=False)
class Same(Backprop):
    """Backprop under another name."""
    name: ClassVar[str] = "same-name"
'''


@pytest.mark.slow
def test_an_entry_point_that_fails_to_import_is_reported_not_fatal(tmp_path, monkeypatch):
    _dist(tmp_path, "broken-dist", {"broken-algo": "lb_broken_mod:Trainer", "not-a-trainer": "lb_not_trainer:f"},
          {"lb_broken_mod": "import not_a_module_anywhere\n", "lb_not_trainer": "def f():\n    pass\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LEARNBENCH_DISABLE_PLUGIN_AUTOLOAD", "")
    registry = discover()
    assert "backprop" in registry.entries
    errors = {e.name: e.error for e in registry.broken}
    assert "No module named 'not_a_module_anywhere'" in errors["broken-algo"]
    assert "is not a trainer class" in errors["not-a-trainer"]
    with pytest.raises(UsageError, match="failed to load .*not_a_module_anywhere"):
        registry.get("broken-algo")
    env = {"PYTHONPATH": str(tmp_path), "LEARNBENCH_DISABLE_PLUGIN_AUTOLOAD": ""}
    listed = run_cli("list", "algorithms", env=env)
    assert listed.returncode == 0 and re.search(r"broken-algo\s+broken-dist\s+1\.2\.3\s+BROKEN: ModuleNotFound",
                                                listed.stdout), listed.stdout
    checked = run_cli("check-plugin", "broken-algo", env=env)
    assert checked.returncode == 2 and "not_a_module_anywhere" in checked.stderr
    monkeypatch.setenv("LEARNBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert not discover().broken  # autoload off: third-party entry points are not even imported


def test_two_distributions_claiming_one_name_is_an_error_naming_both(tmp_path, monkeypatch):
    _dist(tmp_path, "first-dist", {"same-name": "lb_same_a:Same"}, {"lb_same_a": GOOD_MODULE})
    _dist(tmp_path, "second-dist", {"same-name": "lb_same_b:Same"}, {"lb_same_b": GOOD_MODULE})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LEARNBENCH_DISABLE_PLUGIN_AUTOLOAD", "")
    with pytest.raises(UsageError, match="'same-name'") as info:
        discover()
    assert "first-dist" in str(info.value) and "second-dist" in str(info.value)


def test_a_plugin_file_claiming_a_builtin_name(tmp_path, capsys):
    path = tmp_path / "dup.py"
    path.write_text(DUPLICATE)
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent(SUITE.split("[[algorithms]]")[0] + '[[algorithms]]\nid = "backprop"\n'))
    assert main(["run", str(suite), "--plugin", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "two plugins claim the algorithm name 'backprop'" in err and "learnbench" in err and "dup" in err
    assert not (tmp_path / "run").exists()
    assert main(["check-plugin", str(path)]) == 1
    assert re.search(r"FAIL  unique_name .*already taken by learnbench", capsys.readouterr().out)


# --- the conformance kit names the rule each broken plugin breaks ----------------------------------------------

@pytest.mark.slow
def test_check_plugin_names_the_failing_checks_of_each_broken_trainer(tmp_path, capsys):
    path = tmp_path / "broken.py"
    path.write_text(BROKEN)
    assert main(["check-plugin", str(path)]) == 1
    failed: dict[str, set[str]] = {}
    name = None
    for line in capsys.readouterr().out.splitlines():
        if re.match(r"^[a-z-]+: class ", line):
            name = line.split(":")[0]
            failed[name] = set()
        elif line.startswith("FAIL  "):
            failed[name].add(line.split()[1])
    assert failed == {k: v for k, v in FAILS.items() if k != "backprop"}


def test_check_plugin_exit_codes(tmp_path, capsys):
    assert main(["check-plugin", "no-such-algorithm"]) == 2
    assert main(["check-plugin", str(tmp_path / "missing.py")]) == 2
    (tmp_path / "empty.py").write_text("x = 1\n")
    assert main(["check-plugin", str(tmp_path / "empty.py")]) == 2
    assert "defines no trainer" in capsys.readouterr().err


# --- the runner isolates a misbehaving trainer -------------------------------------------------------------------

PICKY = '''
from dataclasses import dataclass
from typing import ClassVar
from learnbench.algorithms.backprop import Backprop

@dataclass(eq=False)
class Picky(Backprop):
    """Validates in __init__ (which belongs in setup) and rejects the suite's lr."""
    name: ClassVar[str] = "picky"

    def __post_init__(self):
        if self.lr is not None and self.lr > 1:
            raise ValueError(f"lr {self.lr} is too large")
'''

EXPECTED = {  # label -> (status, text in the error)
    "raises": ("failed", "deliberate failure in step 3"),
    "raises-in-setup": ("failed", "deliberate failure in setup"),
    "nan-after": ("diverged", "non-finite training loss at step 6"),
    "mutates": ("failed", "Mutates.step modified its batch (batch.x) at step 0"),
    "wrong-type": ("failed", "WrongType.step returned float, not StepStats"),
    "eval-not-module": ("failed", "EvalNotModule.eval_model returned OrderedDict, not torch.nn.Module"),
    "picky": ("failed", "rejected the recorded hyper-parameters"),
}


def test_each_misbehaving_trainer_fails_its_own_trial_only(tmp_path):
    broken, picky = tmp_path / "broken.py", tmp_path / "picky.py"
    broken.write_text(BROKEN)
    picky.write_text(PICKY)
    entries = [{"id": "backprop", "batch_size": 32}] + [{"id": name, "batch_size": 32} for name in EXPECTED]
    entries[-1]["lr"] = 2.0
    trials = make_trials({"algorithms": entries}, plugin_files=[broken, picky])
    (tmp_path / "run").mkdir()
    store = Store(tmp_path / "run")
    store.add_trials(trials)
    run_local(trials, store, str(tmp_path / "run"), None, 1, 1, ProgressView(len(trials), 0, enabled=False))
    rows = {t.label: t for t in store.trials()}
    store.close()
    for label, (status, text) in EXPECTED.items():
        assert rows[label].status == status and text in rows[label].error, (label, rows[label].error)
    good = rows["backprop"]
    assert good.status == "done" and good.error is None
    alone = run_trial(make_trials({})[0], None)  # the same backprop trial with no misbehaving neighbour
    assert good.id == make_trials({})[0].id
    for key in ("test/accuracy", "test/loss", "val/loss", "cost/flops", "cost/steps"):
        assert good.metrics[key] == alone.metrics[key], key


def test_a_batch_written_on_a_later_checked_step_is_caught(tmp_path):
    path = tmp_path / "late.py"
    path.write_text(textwrap.dedent(f'''
        from dataclasses import dataclass
        from typing import ClassVar
        from learnbench.algorithms.backprop import Backprop

        @dataclass(eq=False)
        class Late(Backprop):
            """Writes into its batch on step {BATCH_CHECK_EVERY} only."""
            name: ClassVar[str] = "late"

            def step(self, batch):
                self._n = getattr(self, "_n", -1) + 1
                if self._n == {BATCH_CHECK_EVERY}:
                    batch.y = batch.y.flip(0)
                return super().step(batch)
    '''))
    trial = make_trials({"algorithms": [{"id": "late", "batch_size": 32}], "budget": {"steps": BATCH_CHECK_EVERY + 5},
                         "eval": {"points": 0}}, plugin_files=[path])[0]
    result = run_trial(trial, None)
    assert result.status == "failed"
    assert f"modified its batch (batch.y) at step {BATCH_CHECK_EVERY}" in result.error


# --- the template ----------------------------------------------------------------------------------------------

def test_new_algorithm_writes_a_template_that_passes_check_plugin(tmp_path, capsys):
    out = tmp_path / "my_rule.py"
    assert main(["new-algorithm", "my-rule", "--out", str(out)]) == 0
    assert 'name: ClassVar[str] = "my-rule"' in out.read_text() and "class MyRule:" in out.read_text()
    assert main(["new-algorithm", "my-rule", "--out", str(out)]) == 2  # never overwrites silently
    assert main(["new-algorithm", "My Rule", "--out", str(tmp_path / "x.py")]) == 2
    assert main(["new-algorithm", "backprop", "--out", str(tmp_path / "y.py")]) == 2
    capsys.readouterr()
    assert main(["check-plugin", str(out)]) == 0
    assert capsys.readouterr().out.count("PASS ") == len(CHECKS)


def test_the_template_module_itself_passes_the_kit_and_renders_to_itself():
    from learnbench import template, trainer_template

    results = check_trainer(trainer_template.MyAlgorithm)
    assert [r.name for r in results if not r.passed] == []
    source = Path(trainer_template.__file__).read_text()
    assert template.render("my-algorithm") == source  # the placeholders are the template's own names


def test_the_template_is_plain_sgd(tmp_path):
    """One template step equals one torch.optim.SGD step (no momentum) on the same model and batch."""
    from learnbench import Batch, TaskInfo
    from learnbench.models import build
    from learnbench.registry import load_plugin_file
    from learnbench.template import render

    path = tmp_path / "sgd_check.py"
    path.write_text(render("sgd-check", str(path)))
    cls = load_plugin_file(path)[0].cls
    torch.manual_seed(0)
    model = build({"kind": "mlp", "hidden": [8]}, (4,), 3)
    reference = build({"kind": "mlp", "hidden": [8]}, (4,), 3)
    reference.load_state_dict(model.state_dict())
    batch = Batch(torch.rand(16, 4), torch.randint(0, 3, (16,)))
    trainer = cls(batch_size=16, lr=0.3)
    trainer.setup(model, TaskInfo((4,), 3, 16, torch.device("cpu")), torch.Generator())
    trainer.step(batch)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.3)
    torch.nn.functional.cross_entropy(reference(batch.x), batch.y).backward()
    optimizer.step()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)


# --- in-process registration and provenance (the kit's way of running any class) ---------------------------------

def test_registered_class_runs_through_the_runner_with_its_provenance(tmp_path):
    from learnbench.algorithms.backprop import Backprop

    class Local(Backprop):
        name = "local-backprop"

    entry = entry_for_class(Local)
    assert entry.provenance() == {"distribution": "test_plugins", "version": "unregistered",
                                  "source": "test_plugins:test_registered_class_runs_through_the_runner_with_its_"
                                            "provenance.<locals>.Local"}
    with registered(entry):
        trial = make_trials({"algorithms": [{"id": "local-backprop", "batch_size": 32}]})[0]
        assert run_trial(trial, None).status == "done"
    assert "local-backprop" not in discover().entries
    assert entry_for_class(Backprop).provenance()["distribution"] == "learnbench"


# --- every built-in trainer passes the kit (trainers added later are picked up here) -----------------------------

@pytest.mark.slow
@parametrize_with_checks([e for e in discover().entries.values() if e.distribution == "learnbench"])
def test_builtin_trainers_pass_the_conformance_kit(trainer, check):
    check(trainer)
