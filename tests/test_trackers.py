"""Experiment trackers (`--log tensorboard --log mlflow`, a suite's `[log]`): what TensorBoard and MLflow hold after a
run matches the store; a failing tracker is a warning and loses no trial; a missing package is exit code 2 before
anything runs; learnbench never imports the tracker packages unless asked."""

import subprocess
import sys
import textwrap

import pytest

from conftest import TINY_SUITE, run_cli
from learnbench import trackers
from learnbench.cli import main
from learnbench.errors import UsageError
from learnbench.store import Store

TWO_SEEDS = TINY_SUITE.replace("seeds = 1", "seeds = 2").replace("points = 4", "points = 3")


def write_suite(folder, text=TWO_SEEDS):
    path = folder / "tiny.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """Two trials, both trackers on, run as a user runs it (a subprocess). One worker keeps it fast: every executor
    calls the same `ProgressView.finish` hook in the driver."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("tracked")
    out = folder / "run"
    result = run_cli("run", str(write_suite(folder)), "--out", str(out), "--workers", "1", "--log", "tensorboard",
                     "--log", "mlflow")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    store = Store.open(out)
    trials, curves = {t.id: t for t in store.trials()}, store.curves()
    store.close()
    assert len(trials) == 2 and all(t.status == "done" for t in trials.values())
    return out, trials, curves


@pytest.mark.slow
def test_tensorboard_holds_every_curve_and_the_hparams(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    out, trials, curves = tracked_run
    assert len(list((out / "tensorboard").iterdir())) == 2  # one run folder per trial
    for trial_id, trial in trials.items():
        events = EventAccumulator(str(out / "tensorboard" / trackers.run_name(trial)), size_guidance={"scalars": 0})
        events.Reload()
        by_metric: dict[str, list] = {}
        for point in curves[trial_id]:
            by_metric.setdefault(point.metric, []).append(point)
        assert by_metric and set(by_metric) <= set(events.Tags()["scalars"])
        for metric, points in by_metric.items():
            logged = events.Scalars(metric)
            assert [e.step for e in logged] == [p.examples for p in points]  # step = examples seen
            assert [e.value for e in logged] == pytest.approx([p.value for p in points], rel=1e-6)
        final = events.Scalars("final/test/accuracy")
        assert final[-1].value == pytest.approx(trial.metrics["test/accuracy"], rel=1e-6)
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        logged_hparams = HParamsPluginData.FromString(content).session_start_info.hparams
        assert logged_hparams["batch_size"].number_value == trial.hparams["batch_size"] == 32
        assert logged_hparams["optimizer"].string_value == trial.hparams["optimizer"]
        assert logged_hparams["betas"].string_value == "[0.9, 0.999]"  # lists and None as JSON
        assert logged_hparams["seed"].number_value == trial.seed
        assert logged_hparams["dataset"].string_value == "digits"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy's, inside MLflow's store
def test_mlflow_has_one_run_per_trial_with_params_metrics_and_tags(tracked_run, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    out, trials, curves = tracked_run
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(trials)
    client = MlflowClient(uri)
    for run in runs:
        trial = trials[run.data.tags["trial_id"]]
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert (tags["label"], tags["dataset"], tags["seed"], tags["status"]) == ("backprop", "digits",
                                                                                 str(trial.seed), "done")
        assert run.info.status == "FINISHED"
        assert params["batch_size"] == "32" and params["optimizer"] == trial.hparams["optimizer"]
        assert params["algorithm"] == "backprop" and params["seed"] == str(trial.seed)
        assert metrics["test/accuracy"] == pytest.approx(trial.metrics["test/accuracy"])
        assert metrics["cost/flops"] == pytest.approx(trial.metrics["cost/flops"])
        points = [p for p in curves[trial.id] if p.metric == "val/accuracy"]
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert sorted(m.step for m in history) == [p.examples for p in points]


def test_a_failing_tracker_is_one_warning_and_the_trial_is_kept(tmp_path, monkeypatch, capsys):
    def broken(self, trial, result):
        raise OSError("disk full\nsecond line")

    monkeypatch.setattr(trackers, "installed", lambda module: True)  # no package needed: log_trial is replaced
    monkeypatch.setattr(trackers.TensorBoardTracker, "log_trial", broken)
    out = tmp_path / "run"
    code = main(["run", str(write_suite(tmp_path)), "--out", str(out), "--workers", "1", "--quiet",
                 "--log", "tensorboard"])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 2, err  # one line per trial
    assert all(w.startswith("learnbench: warning: tensorboard could not log backprop digits mlp-16x1 s")
               and w.endswith("OSError: disk full second line") for w in warnings), warnings
    store = Store.open(out)
    assert sorted(store.statuses().values()) == ["done", "done"]
    store.close()


@pytest.mark.parametrize("argv_tail,suite_log,missing", [
    (["--log", "mlflow"], "", "mlflow"),
    (["--log", "tensorboard=tb"], "", "tensorboard"),
    ([], "[log]\ntensorboard = true\n", "tensorboard"),
])
def test_a_missing_tracker_package_is_a_usage_error_before_anything_runs(tmp_path, monkeypatch, capsys, argv_tail,
                                                                        suite_log, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import mlflow` now fails as if it were not installed
    suite = write_suite(tmp_path, TWO_SEEDS + suite_log)
    out = tmp_path / "run"
    code = main(["run", str(suite), "--out", str(out), *argv_tail])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("learnbench: error:") and "learnbench[track]" in lines[0] and missing in lines[0]
    assert not out.exists()


def test_settings_from_the_suite_and_the_flags(monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda module: True)
    table = {"tensorboard": True, "mlflow": "file:./mlruns"}
    assert trackers.settings(table, []) == {"tensorboard": None, "mlflow": "file:./mlruns"}
    assert trackers.settings(table, ["mlflow=http://127.0.0.1:5000"])["mlflow"] == "http://127.0.0.1:5000"
    assert trackers.settings({"tensorboard": False}, ["mlflow"]) == {"mlflow": None}
    assert trackers.settings(table, ["none", "tensorboard=tb"]) == {"tensorboard": "tb"}
    for table, flags, match in [({}, ["tensorbord"], "did you mean 'tensorboard'"), ({"wandb": True}, [], "[log]"),
                                ({"mlflow": 1}, [], "true, false or"), ({}, ["mlflow="], "give a folder or URI")]:
        with pytest.raises(UsageError, match=match.replace("[", r"\[")):
            trackers.settings(table, flags)


def test_hparams_are_flat_scalars():
    from helpers import make_trials

    trial = make_trials({"algorithms": [{"id": "backprop", "batch_size": 32}]})[0]
    values = trackers.hparams(trial)
    assert values["batch_size"] == 32 and values["model"] == "mlp-16x1" and values["seed"] == 0
    assert all(isinstance(v, (bool, int, float, str)) for v in values.values())
    assert "/" not in trackers.run_name(trial) and trial.id[:8] in trackers.run_name(trial)


def test_importing_learnbench_imports_no_tracker_package():
    code = ("import sys, learnbench, learnbench.cli, learnbench.trackers, learnbench.executor\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # not even torch: `learnbench show` stays fast
