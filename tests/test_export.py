"""`learnbench export` and `learnbench.load_results`: tidy tables that read back with one row per trial, carry the
curves and the provenance, hold the numbers `show --json` prints, and refuse bad input with one line and exit 2."""

import json
import sys
import textwrap
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")

import learnbench  # noqa: E402
from learnbench import export  # noqa: E402
from learnbench.cli import main  # noqa: E402
from test_cli import assert_usage_error  # noqa: E402

SUITE = """
name = "export"
datasets = ["digits"]
seeds = 2
[[models]]
kind = "mlp"
hidden = [8]
[budget]
steps = 12
[eval]
points = 2
[robustness]
examples = 0
[[algorithms]]
id = "backprop"
batch_size = 32
[[algorithms]]
id = "fa"
batch_size = 32
"""
PROVENANCE = ["prov.git_commit", "prov.learnbench", "prov.torch", "prov.numpy", "prov.python", "prov.device",
              "prov.plugin.distribution", "prov.plugin.version"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two small runs of the embedded digits data: backprop on seeds 0, 1 and fa on seed 0 (in this process)."""
    root = tmp_path_factory.mktemp("export")
    (root / "s.toml").write_text(textwrap.dedent(SUITE))
    first, second = root / "bp", root / "fa"
    for out, argv in [(first, ["--algorithms", "backprop"]), (second, ["--algorithms", "fa", "--seeds", "1"])]:
        assert main(["run", str(root / "s.toml"), *argv, "--out", str(out), "--workers", "1", "--quiet"]) == 0
    return first, second


def read(path):
    """A table read back; a CSV's trial ids stay text (an id of digits only would read as a number)."""
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype={"trial": str})


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_tables_read_back_with_one_row_per_trial(runs, tmp_path, capsys, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = runs[0] / "export" if fmt == "parquet" else tmp_path / "tables"
    assert main(["export", str(runs[0]), "--format", fmt, *(["--out", str(out)] if fmt == "csv" else [])]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(out / f"{table}.{fmt}") for table in export.TABLES]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{t}.{fmt}" for t in export.TABLES)  # no temp left
    trials, metrics, curves = (read(out / f"{table}.{fmt}") for table in export.TABLES)
    assert len(trials) == 2 and trials["trial"].is_unique and set(trials["seed"]) == {0, 1}
    assert (trials["status"] == "done").all() and (trials["budget.steps"] == 12).all()
    assert set(PROVENANCE) <= set(trials.columns) and trials["prov.torch"].notna().all()
    assert (trials["prov.plugin.distribution"] == "learnbench").all()
    assert {"hp.lr", "hp.batch_size", "model.kind"} <= set(trials.columns) and (trials["hp.batch_size"] == 32).all()
    assert json.loads(trials["hp.betas"].iloc[0]) == [0.9, 0.999]  # a list is its JSON text
    assert list(metrics.columns) == ["trial", "run_dir", "name", "value"]
    assert list(curves.columns) == ["trial", "run_dir", "step", "examples", "flops", "train_seconds", "metric",
                                    "value"]
    for trial in trials["trial"]:
        assert (metrics[(metrics["trial"] == trial) & (metrics["name"] == "cost/steps")]["value"] == 12).all()
        points = curves[(curves["trial"] == trial) & (curves["metric"] == "test/accuracy")]
        assert len(points) >= 2 and points["step"].is_monotonic_increasing and points["examples"].iloc[-1] > 0


def test_the_same_numbers_as_show_json(runs, capsys):
    assert main(["show", str(runs[0]), "--json", "--curves"]) == 0
    shown = {t["id"]: t for t in json.loads(capsys.readouterr().out)["trials"]}
    results = learnbench.load_results(runs[0])
    assert set(shown) == set(results.trials["trial"])
    for row in results.trials.to_dict("records"):
        trial = shown[row["trial"]]
        assert {"id", "algorithm", "label", "dataset", "model", "seed", "status", "hparams", "tuning", "error",
                "metrics"} <= set(trial)  # the keys consumers read before config, provenance and curves came
        assert trial["config"]["id"] == row["trial"] and trial["config"]["hparams"] == trial["hparams"]
        assert trial["provenance"]["git_commit"] == row["prov.git_commit"]
        assert trial["provenance"]["torch"] == row["prov.torch"] and row["hp.lr"] == trial["hparams"]["lr"]
        mine = results.metrics[results.metrics["trial"] == row["trial"]]
        assert {k: None if pd.isna(v) else v for k, v in zip(mine["name"], mine["value"])} == trial["metrics"]
        curve = results.curves[(results.curves["trial"] == row["trial"])
                               & (results.curves["metric"] == "test/loss")]
        assert curve["value"].tolist() == trial["curves"]["test/loss"]["value"]
        assert curve["flops"].tolist() == trial["curves"]["test/loss"]["flops"]
    wide = results.with_metrics("test/accuracy")
    assert wide.set_index("trial")["test/accuracy"].to_dict() == {
        t["id"]: t["metrics"]["test/accuracy"] for t in shown.values()}


def test_several_runs_in_one_export(runs, tmp_path, capsys):
    out = tmp_path / "both"
    assert main(["export", *map(str, runs), "--format", "csv", "--out", str(out)]) == 0
    trials = read(out / "trials.csv")
    assert len(trials) == 3 and trials.groupby("algorithm").size().to_dict() == {"backprop": 2, "fa": 1}
    assert set(trials["run_dir"]) == set(map(str, runs))
    assert set(read(out / "curves.csv")["trial"]) == set(trials["trial"])
    assert "hp.feedback_init" in trials.columns  # fa's own hyper-parameter: NaN for backprop
    capsys.readouterr()
    assert_usage_error(capsys, ["export", *map(str, runs)], "--out is required")


@pytest.mark.parametrize("case,match", [
    ("not-a-run", "not a learnbench run directory"),
    ("no-pyarrow", "needs pyarrow"),
    ("unwritable", "cannot write the export"),
    ("out-is-a-file", "exists and is not a folder"),
    ("curves-without-json", "--curves needs --json"),
])
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, monkeypatch, case, match):
    out = tmp_path / "out"
    argv = ["export", str(runs[0]), "--out", str(out)]
    if case == "not-a-run":
        (tmp_path / "empty").mkdir()
        argv[1] = str(tmp_path / "empty")
    elif case == "no-pyarrow":  # Parquet is the default format, RUN_DIR/export the default folder
        monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError (pandas 3 uses
        # pyarrow for its strings when it is installed, so only a refusal before any table is built can be tested)
        argv, out = ["export", str(runs[1])], runs[1] / "export"
    elif case == "unwritable":
        out = Path("/proc/learnbench-export")  # refuses new folders even to root, whom chmod does not stop
        argv[-1] = str(out)
    elif case == "out-is-a-file":
        (tmp_path / "file").write_text("x")
        argv[-1] = str(tmp_path / "file")
    else:
        argv = ["show", str(runs[0]), "--curves"]
    assert_usage_error(capsys, argv, match, None if case == "out-is-a-file" else out)


def test_a_failed_write_leaves_nothing_behind(runs, tmp_path, capsys, monkeypatch):
    calls = []
    to_csv = pd.DataFrame.to_csv

    def fail_on_the_third(self, path, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return to_csv(self, path, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail_on_the_third)
    out = tmp_path / "new" / "out"  # both folders made by the export, both gone after it failed
    assert_usage_error(capsys, ["export", str(runs[0]), "--format", "csv", "--out", str(out)],
                       "No space left on device", out.parent)


def test_a_second_export_replaces_the_first(runs, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        assert main(["export", str(runs[1]), "--format", "csv", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["curves.csv", "metrics.csv", "trials.csv"]
    assert len(read(out / "trials.csv")) == 1
