"""`learnbench tune`: equal-budget tuning through Optuna. The drawn configurations are deterministic and differ
between studies, a search configuration never reads the test split, a failing configuration is a failed trial of a
study that still completes, bad arguments are one-line usage errors that write nothing, a SIGKILL mid-study resumes
without rerunning or duplicating anything, and the report and `show` carry default and tuned rows."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from helpers import make_trials  # noqa: E402
from learnbench import cli, runner  # noqa: E402
from learnbench.reports import build_report  # noqa: E402
from learnbench.studies import Objective  # noqa: E402
from learnbench.trial import CurvePoint, StoredTrial  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGIN = '''
from dataclasses import dataclass, replace
from typing import ClassVar

from learnbench.algorithms.backprop import Backprop
from learnbench.search_space import Choice, LogUniform, Uniform


@dataclass(eq=False)
class Tunable(Backprop):
    """Backprop with a two-dimensional space: a log-uniform learning rate and a choice of optimizer."""
    name: ClassVar[str] = "tunable"
    search_space: ClassVar[dict] = {"lr": LogUniform(1e-3, 1e-1), "optimizer": Choice(("adam", "sgd"))}


@dataclass(eq=False)
class Fragile(Backprop):
    """Raises in its first step when x > 0.6, diverges when 0.3 < x <= 0.6."""
    name: ClassVar[str] = "fragile"
    x: float = 0.0
    """Where the configuration lies."""
    search_space: ClassVar[dict] = {"x": Uniform(0.0, 1.0)}

    def step(self, batch):
        if self.x > 0.6:
            raise RuntimeError("deliberate failure of this configuration")
        stats = super().step(batch)
        return replace(stats, loss=float("nan")) if self.x > 0.3 else stats


@dataclass(eq=False)
class NoSpace(Backprop):
    """Declares no space."""
    name: ClassVar[str] = "no-space"
    search_space: ClassVar = None


@dataclass(eq=False)
class BadSpace(Backprop):
    """Its space reaches negative learning rates, which validate() refuses."""
    name: ClassVar[str] = "bad-space"
    search_space: ClassVar[dict] = {"lr": Uniform(-0.1, 0.1)}
'''

SUITE = """
name = "tunetest"
datasets = ["digits"]
seeds = 1
reference = "tunable"
[[models]]
kind = "mlp"
hidden = [16]
[budget]
epochs = 1
[eval]
points = 3
[robustness]
examples = 20
attacks = ["fgsm"]
[[algorithms]]
id = "tunable"
batch_size = 32
[[algorithms]]
id = "fragile"
batch_size = 32
"""

TUNE = ["--trials", "4", "--studies", "2", "--workers", "1", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tune")
    (root / "plugin.py").write_text(PLUGIN)
    (root / "suite.toml").write_text(textwrap.dedent(SUITE))
    return root / "suite.toml", root / "plugin.py"


def tune(files, out: Path, *extra: str) -> tuple[int, str, str]:
    """`learnbench tune` in this process (one worker: trials run inline); (exit code, stdout, stderr)."""
    suite, plugin = files
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["tune", str(suite), "--plugin", str(plugin), "--out", str(out), *TUNE, *extra])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def tuned(files, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("tuned") / "run"
    code, stdout, stderr = tune(files, out)
    assert code == 0, stderr
    return out, stdout


def configs(run_dir: Path) -> list[dict]:
    db = sqlite3.connect(run_dir / "results.sqlite")
    rows = db.execute("SELECT id, status, config FROM trials ORDER BY rowid").fetchall()
    db.close()
    return [{"id": i, "status": s, **json.loads(c)} for i, s, c in rows]


def searched(run_dir: Path) -> dict[tuple, dict]:
    """(entry, study, index) -> the drawn hyper-parameters of every search configuration."""
    return {(c["tuning"]["entry"], c["tuning"]["study"], c["tuning"]["index"]): c["hparams"]
            for c in configs(run_dir) if (c.get("tuning") or {}).get("role") == "search"}


@pytest.mark.slow
def test_same_command_draws_the_same_configurations_and_studies_differ(files, tuned, tmp_path):
    first = searched(tuned[0])
    assert len(first) == 2 * 2 * 4
    code, _, stderr = tune(files, tmp_path / "again")
    assert code == 0, stderr
    assert searched(tmp_path / "again") == first
    for entry, keys in (("tunable", ("lr", "optimizer")), ("fragile", ("x",))):
        studies = [[tuple(first[(entry, s, i)][k] for k in keys) for i in range(4)] for s in range(2)]
        assert not set(studies[0]) & set(studies[1]), "two studies drew the same point"
    lrs = [first[("tunable", s, i)]["lr"] for s in range(2) for i in range(4)]
    assert all(1e-3 <= lr <= 1e-1 for lr in lrs) and len(set(lrs)) == 8


def test_a_search_trial_never_computes_test_metrics(tuned):
    run_dir = tuned[0]
    db = sqlite3.connect(run_dir / "results.sqlite")
    roles = {c["id"]: (c.get("tuning") or {}).get("role") for c in configs(run_dir)}
    search = [i for i, role in roles.items() if role == "search"]
    for trial in search:
        names = {n for (n,) in db.execute("SELECT name FROM metrics WHERE trial=?", (trial,))}
        curves = {m for (m,) in db.execute("SELECT DISTINCT metric FROM curves WHERE trial=?", (trial,))}
        assert not any(n.startswith(("test/", "robust/")) for n in names | curves), names | curves
        assert not (run_dir / "models" / f"{trial}.safetensors").exists()
    done = [i for i in search if db.execute("SELECT status FROM trials WHERE id=?", (i,)).fetchone()[0] == "done"]
    assert done and all(db.execute("SELECT count(*) FROM metrics WHERE trial=? AND name='val/accuracy'",
                                   (i,)).fetchone()[0] == 1 for i in done)
    others = [i for i, role in roles.items() if role != "search"]
    assert all(db.execute("SELECT count(*) FROM metrics WHERE trial=? AND name IN ('test/accuracy', "
                          "'robust/fgsm/0.1')", (i,)).fetchone()[0] == 2 for i in others)


def test_the_runner_never_touches_the_test_split_of_a_search_trial(monkeypatch):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the test split was read ({name})")

        def __getitem__(self, item):
            raise AssertionError("the test split was read")

    trial = make_trials({"robustness": {"examples": 20, "attacks": ["fgsm"]}})[0]
    splits = runner._data(trial.dataset, None, runner.torch.device("cpu"))
    poisoned = dataclasses.replace(splits, test_x=Untouchable(), test_y=Untouchable())
    monkeypatch.setattr(runner, "_data", lambda *args: poisoned)
    search = dataclasses.replace(trial, tuning={"role": "search", "entry": "backprop", "study": 0, "index": 0})
    result = runner.run_trial(search, None)
    assert result.status == "done", result.error
    assert "val/accuracy" in result.metrics and not any(k.startswith(("test/", "robust/")) for k in result.metrics)
    assert runner.run_trial(trial, None).status == "failed"  # the ordinary trial does read it


def test_a_failing_configuration_is_a_failed_trial_and_the_study_completes(tuned):
    import optuna

    run_dir = tuned[0]
    fragile = [c for c in configs(run_dir) if (c.get("tuning") or {}).get("entry") == "fragile"
               and c["tuning"]["role"] == "search"]
    statuses = {c["status"] for c in fragile}
    assert {"failed", "diverged", "done"} <= statuses, statuses
    storage = optuna.storages.RDBStorage(f"sqlite:///{run_dir / 'tuning.sqlite'}")
    studies = [s for s in optuna.get_all_study_summaries(storage) if "/fragile/" in s.study_name]
    assert len(studies) == 2
    for summary in studies:
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        values = [t.value for t in study.trials]
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4 and 0.0 in values and max(values) > 0
    tuned_runs = [c for c in configs(run_dir) if (c.get("tuning") or {}).get("role") == "tuned"
                  and c["tuning"]["entry"] == "fragile"]
    assert len(tuned_runs) == 2 and all(c["hparams"]["x"] <= 0.3 and c["status"] == "done" for c in tuned_runs)


def test_report_and_show_have_default_and_tuned_rows(tuned, tmp_path):
    run_dir, stdout = tuned
    for text in (stdout, cli_show(run_dir)):
        assert all(label in text for label in ("tunable (default)", "tunable (tuned)", "fragile (tuned)"))
        assert "(search)" not in text and "16 search configuration(s)" in text
    written = build_report([run_dir], tmp_path / "report")
    md = written["report.md"].read_text()
    tuning = md[md.index("### Tuning"):]
    assert "(search)" not in md
    assert "fragile" in tuning and "Δ test" in tuning and "nominal FLOPs" in tuning and "reach 99%" in tuning
    assert any(name.startswith("figures/") and "tuning" in name and "tunable" in name for name in written)
    final = md[md.index("### Final accuracy"):md.index("### Tuning")]
    assert "tunable (default)" in final and "tunable (tuned)" in final


def cli_show(run_dir: Path) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["show", str(run_dir)]) == 0
    return out.getvalue()


def test_rerunning_a_finished_tune_runs_nothing(files, tuned):
    before = configs(tuned[0])
    code, _, stderr = tune(files, tuned[0])
    assert code == 0, stderr
    assert "round" not in stderr and configs(tuned[0]) == before


@pytest.mark.parametrize("extra, message", [
    (["--trials", "0"], "--trials must be a positive integer"),
    (["--studies", "-2"], "--studies must be a positive integer"),
    (["--trials", "three"], "invalid int value"),
    (["--sampler", "grid"], "invalid choice"),
    (["--objective", "time-to-target"], "needs --target"),
    (["--objective", "time-to-target", "--target", "1.5", "--currency", "flops"], "--target is a validation"),
    (["--target", "0.9"], "go with --objective time-to-target"),
    (["--algorithms", "no-space"], "declares no search_space"),
    (["--algorithms", "bad-space"], "lr must be positive"),
])
def test_bad_arguments_are_one_line_exit_2_and_write_nothing(files, tmp_path, extra, message):
    out = tmp_path / "never"
    code, stdout, stderr = tune(files, out, *extra)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


def test_time_to_target_scores_the_cost_at_the_first_validation_reach():
    objective = Objective("time-to-target", 0.8, "examples")
    trial = StoredTrial(id="x", label="a", algorithm="a", hparams={}, dataset="digits", model={}, model_label="m",
                        budget=None, seed=0, status="done")
    curve = [CurvePoint(s, 100 * s, 1e6 * s, 0.1 * s, "val/accuracy", v) for s, v in ((0, .1), (1, .7), (2, .85))]
    assert objective.score(trial, curve) == 200 and objective.direction == "minimize"
    assert objective.score(trial, curve[:2]) == float("inf")
    assert objective.score(dataclasses.replace(trial, status="diverged"), curve) == float("inf")
    assert Objective().score(dataclasses.replace(trial, metrics={"val/accuracy": 0.9}), []) == 0.9


KILL_SUITE = """
name = "killtune"
datasets = ["digits"]
seeds = 1
[[models]]
kind = "mlp"
hidden = [32]
[budget]
epochs = 8
[eval]
points = 4
[robustness]
examples = 0
[[algorithms]]
id = "tunable"
batch_size = 32
"""


def _search_rows(db_path: Path, statuses: str) -> dict[str, float]:
    """id -> finished time of the search trials in one of `statuses` (an SQL list)."""
    if not db_path.exists():
        return {}
    db = sqlite3.connect(db_path, timeout=10)
    try:
        return dict(db.execute(f"SELECT id, finished FROM trials WHERE status IN ({statuses}) "
                               "AND label LIKE '%(search)'").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def _ended(db_path: Path) -> dict[str, float]:
    return _search_rows(db_path, "'done', 'failed', 'diverged'")


@pytest.mark.slow
def test_sigkill_mid_study_then_rerun_continues_without_duplicates(files, tmp_path):
    suite = tmp_path / "killtune.toml"
    suite.write_text(textwrap.dedent(KILL_SUITE))
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "learnbench.cli", "tune", str(suite), "--plugin", str(files[1]), "--out", str(out),
            "--trials", "5", "--studies", "1", "--workers", "1", "--quiet"]  # inline: no worker start-up per round
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    db_path = out / "results.sqlite"
    while not (len(_ended(db_path)) >= 2 and _search_rows(db_path, "'running'")) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, while a configuration asked from the study is training
    proc.wait()
    before = _ended(db_path)
    assert 2 <= len(before) < 5, "the study should have been killed part-way"
    optuna_db = sqlite3.connect(out / "tuning.sqlite")
    assert optuna_db.execute("SELECT count(*) FROM trials WHERE state='RUNNING'").fetchone()[0] >= 1
    optuna_db.close()

    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    db = sqlite3.connect(out / "results.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    search = {i: (s, json.loads(c)["tuning"]["index"]) for i, s, c in
              db.execute("SELECT id, status, config FROM trials WHERE label LIKE '%(search)'")}
    assert sorted(index for _, index in search.values()) == [0, 1, 2, 3, 4], "a configuration was duplicated"
    assert all(status == "done" for status, _ in search.values())
    after = _ended(out / "results.sqlite")
    assert all(after[t] == finished for t, finished in before.items()), "a finished configuration was rerun"
    assert db.execute("SELECT count(*) FROM trials WHERE label='tunable (tuned)' AND status='done'").fetchone()[0] == 1
    optuna_db = sqlite3.connect(out / "tuning.sqlite")
    assert optuna_db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    states = [s for (s,) in optuna_db.execute("SELECT state FROM trials ORDER BY number")]
    assert states == ["COMPLETE"] * 5, states


def test_entries_sharing_a_label_on_different_models_are_tuned_from_their_own_values(mnist_dir):
    """The mnist suite has two `kolen-pollack` entries (the cnn's lr 1e-3, the MLP's lr 2e-3 with decay 0.1):
    each problem's search starts from its own entry, and an override to one model keeps only that one."""
    from learnbench import tune

    base = ["tune", "mnist", "--algorithms", "kolen-pollack", "--seeds", "1", "--trials", "2", "--studies", "1",
            "--data-dir", str(mnist_dir)]
    plan = tune.prepare(cli.build_parser().parse_args(base))
    values = {s.defaults[0].model_label: s.values for s in plan.searches}
    assert values["cnn"]["lr"] == 1e-3 and "decay" not in values["cnn"]
    assert values["mlp-256x2"]["lr"] == 2e-3 and values["mlp-256x2"]["decay"] == 0.1
    one = tune.prepare(cli.build_parser().parse_args(base + ["--set", "model.kind=mlp", "--set",
                                                             "model.hidden=[256,256]"]))
    assert [(s.defaults[0].model_label, s.values["lr"]) for s in one.searches] == [("mlp-256x2", 2e-3)]
