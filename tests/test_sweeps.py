"""Sweeps: an [[algorithms]] entry's `sweep = { lr = [...] }` expands into labelled entries, is validated before
anything runs, is recorded in each trial (`Trial.sweep`), and the report draws a figure per swept hyper-parameter."""

import json

import pytest
from conftest import run_cli
from helpers import make_trials

from learnbench.errors import UsageError
from learnbench.trial import Trial

pytestmark = pytest.mark.usefixtures("one_thread")


def swept(sweep, **fixed):
    return {"algorithms": [{"id": "backprop", "batch_size": 32, **fixed, "sweep": sweep}]}


def test_three_values_make_three_labelled_entries():
    trials = make_trials(swept({"lr": [0.05, 0.1, 0.2]}))
    assert [t.label for t in trials] == ["backprop lr=0.05", "backprop lr=0.1", "backprop lr=0.2"]
    assert [t.hparams["lr"] for t in trials] == [0.05, 0.1, 0.2]
    assert all(t.hparams["batch_size"] == 32 for t in trials)
    assert [t.sweep for t in trials] == [{"entry": "backprop", "values": {"lr": v}} for v in (0.05, 0.1, 0.2)]
    assert len({t.id for t in trials}) == 3
    config = trials[0].config()
    assert config["sweep"] == {"entry": "backprop", "values": {"lr": 0.05}}
    assert Trial.from_config(json.loads(json.dumps(config))) == trials[0]  # the store's round trip keeps it
    assert "sweep" not in make_trials({})[0].config()  # an ordinary trial's config (and id) are unchanged


def test_two_keys_make_the_product_in_a_stable_order_under_the_entry_label():
    trials = make_trials(swept({"lr": [1e-5, 0.1], "optimizer": ["sgd", "adam"]}, label="bp"))
    assert [t.label for t in trials] == ["bp lr=1e-05 optimizer=sgd", "bp lr=1e-05 optimizer=adam",
                                         "bp lr=0.1 optimizer=sgd", "bp lr=0.1 optimizer=adam"]
    assert [(t.hparams["lr"], t.hparams["optimizer"]) for t in trials] == [
        (1e-5, "sgd"), (1e-5, "adam"), (0.1, "sgd"), (0.1, "adam")]
    assert {t.sweep["entry"] for t in trials} == {"bp"}


def test_a_swept_entry_keeps_its_model_and_dataset_filters():
    suite = {"models": [{"kind": "mlp", "hidden": [16]}, {"kind": "mlp", "hidden": [8]}],
             "algorithms": [{"id": "backprop", "models": ["mlp-8x1"], "sweep": {"lr": [0.1, 0.2]}}]}
    assert {t.model_label for t in make_trials(suite)} == {"mlp-8x1"}


@pytest.mark.parametrize("sweep, fixed, message", [
    ({"lr": 0.1}, {}, "must be a table of non-empty lists"),
    ({"lr": []}, {}, "must be a table of non-empty lists"),
    ([0.1, 0.2], {}, "must be a table of non-empty lists"),
    ({"lrr": [0.1]}, {}, "lrr not a hyper-parameter of 'backprop' (did you mean 'lr'?); known: batch_size"),
    ({"lr": [0.1, 0.2]}, {"lr": 0.3}, "lr both fixed and swept"),
    ({"lr": [0.1, "fast"]}, {}, "backprop.lr must be float"),
    ({"lr": [0.1, 0.1]}, {}, "lr lists a value twice"),
])
def test_bad_sweeps_are_one_line_usage_errors(sweep, fixed, message):
    with pytest.raises(UsageError) as err:
        make_trials(swept(sweep, **fixed))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_set_on_a_swept_key_is_a_usage_error_and_set_sweep_replaces_the_sweep():
    with pytest.raises(UsageError, match=r"lr both fixed and swept .*--set backprop\.sweep=\.\.\. replaces"):
        make_trials(swept({"lr": [0.1, 0.2]}), sets=["backprop.lr=0.5"])
    trials = make_trials(swept({"lr": [0.1, 0.2]}), sets=["backprop.sweep={ momentum = [0.5, 0.9] }"])
    assert [t.label for t in trials] == ["backprop momentum=0.5", "backprop momentum=0.9"]


@pytest.mark.slow
def test_a_tiny_sweep_runs_and_the_report_draws_its_figure(tiny_suite, tmp_path):
    tiny_suite.write_text(tiny_suite.read_text().replace("[budget]\nsteps = 40", "[budget]\nsteps = 8")
                          + "sweep = { lr = [0.01, 0.1, 1.0] }\n")
    out = tmp_path / "run"
    ran = run_cli("run", str(tiny_suite), "--out", str(out), "--quiet", "--device", "cpu")
    assert ran.returncode in (0, 1), ran.stderr  # lr=1.0 may diverge: the run still completes
    shown = json.loads(run_cli("show", str(out), "--json").stdout)
    assert sorted(t["label"] for t in shown["trials"]) == ["backprop lr=0.01", "backprop lr=0.1", "backprop lr=1"]
    report = run_cli("report", str(out))
    assert report.returncode == 0, report.stderr
    figures = sorted(p.name for p in (out / "figures").iterdir() if "sweep" in p.name)
    assert len(figures) == 1 and figures[0].endswith("sweep-lr.svg")
    md = (out / "report.md").read_text()
    assert "### Sweeps" in md and f"figures/{figures[0]}" in md
    assert "sweep of lr" in (out / "report.html").read_text()
