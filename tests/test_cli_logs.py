"""What the command line says: one line per finished trial when stderr is a log file, each problem's budget at
start, quiet exits into a closed pipe, and "did you mean" hints for misspelt names."""

import re
import subprocess
import sys
import textwrap

import pytest

from conftest import TINY_SUITE, run_cli
from learnbench import config
from learnbench.cli import main
from learnbench.registry import discover
from learnbench.trial import Budget

TWO_SEEDS = TINY_SUITE.replace("seeds = 1", "seeds = 2").replace("points = 4", "points = 2")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-trial run with stderr piped (not a terminal), its budget replaced on the command line."""
    folder = tmp_path_factory.mktemp("logs")
    suite = folder / "two.toml"
    suite.write_text(textwrap.dedent(TWO_SEEDS))
    out = folder / "run"
    result = run_cli("run", str(suite), "--out", str(out), "--workers", "1", "--set", "budget.steps=30")
    assert result.returncode == 0, result.stderr
    return out, result.stderr


@pytest.mark.slow
def test_one_line_per_finished_trial_when_stderr_is_not_a_terminal(finished_run):
    _, err = finished_run
    assert "Traceback" not in err and "|" not in err  # no progress bars in a log file
    lines = [line for line in err.splitlines() if re.match(r"learnbench: \[\d/2\]", line)]
    assert len(lines) == 2, err
    for k, line in enumerate(lines, 1):
        assert re.fullmatch(rf"learnbench: \[{k}/2\] backprop digits mlp-16x1 s[01]: done, test accuracy 0\.\d{{4}}, "
                            r"\d+\.\d s training, \d+\.\d s wall", line), line
    assert {line.split()[5] for line in lines} == {"s0:", "s1:"}


def test_the_resolved_budget_is_printed_at_start(finished_run):
    _, err = finished_run
    assert "learnbench: budget digits x mlp-16x1: steps = 30\n" in err  # the suite's 40 steps, replaced


@pytest.mark.slow
@pytest.mark.parametrize("reader", [["head", "-n", "1"], ["true"]])  # `true` leaves before anything is written
def test_show_into_a_closed_pipe_exits_quietly(finished_run, reader):
    out, _ = finished_run
    show = subprocess.Popen([sys.executable, "-m", "learnbench.cli", "show", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    head = subprocess.Popen(reader, stdin=show.stdout, stdout=subprocess.PIPE)
    show.stdout.close()  # only the reader holds the pipe: when it leaves, writes fail with EPIPE
    first, _ = head.communicate(timeout=60)
    err = show.stderr.read().decode()
    assert show.wait(timeout=60) == 0, err
    assert err == ""
    if reader[0] == "head":
        assert first.decode().startswith("dataset")


def usage_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err


@pytest.fixture
def suite_path(tmp_path):
    def write(text=TINY_SUITE):
        path = tmp_path / "s.toml"
        path.write_text(textwrap.dedent(text))
        return str(path)
    return write


@pytest.mark.parametrize("argv,text,match", [
    (["--algorithms", "kolen-polack"], TINY_SUITE, "kolen-polack (did you mean 'kolen-pollack'?) neither in suite"),
    ([], TINY_SUITE.replace('id = "backprop"', 'id = "kolen-polack"'),
     "unknown algorithm 'kolen-polack' (did you mean 'kolen-pollack'?); installed:"),
    (["--datasets", "digit"], TINY_SUITE, "unknown dataset 'digit' (did you mean 'digits'?)"),
    (["--set", "backprop.lrr=0.1"], TINY_SUITE, "unknown hyper-parameter(s) lrr for 'backprop' (did you mean 'lr'?)"),
    (["--set", "bugdet.steps=9"], TINY_SUITE, "unknown --set key 'bugdet.steps' (did you mean 'budget.steps'?)"),
    (["--set", "backprpo.lr=0.1"], TINY_SUITE, "(did you mean 'backprop.lr'?)"),
    (["--set", "budget.time=9"], TINY_SUITE, "unknown key(s) time (did you mean 'time_s'?)"),
    ([], TINY_SUITE.replace("seeds = 1", "seedz = 1"), "unknown key(s) seedz (did you mean 'seeds'?)"),
    ([], TINY_SUITE.replace("points = 4", "pionts = 4"), "unknown key(s) pionts (did you mean 'points'?)"),
])
def test_did_you_mean(tmp_path, capsys, suite_path, argv, text, match):
    out = tmp_path / "out"
    usage_error(capsys, ["run", suite_path(text), *argv, "--out", str(out)], match)
    assert not out.exists()


def test_did_you_mean_suite_and_check_plugin(capsys):
    usage_error(capsys, ["run", "mnistt"], "unknown suite 'mnistt' (did you mean 'mnist'?)")
    usage_error(capsys, ["check-plugin", "kolen-polack"], "(did you mean 'kolen-pollack'?)")


def test_no_hint_when_nothing_is_close(capsys):
    usage_error(capsys, ["run", "zzzzzz"], "unknown suite 'zzzzzz'; built-in suites:")


def resolve(suite, sets=()):
    registry = discover()
    return config.resolve(config.apply_overrides(suite, sets=list(sets), registry=registry), registry, "cpu", "t")


def budget_suite():
    """A suite budget of epochs, a model with its own time budget, an unranked entry with its own steps."""
    return {"name": "b", "datasets": ["digits"], "seeds": 1, "budget": {"epochs": 15}, "robustness": {"examples": 0},
            "models": [{"kind": "mlp", "hidden": [16]}, {"kind": "mlp", "hidden": [8], "budget": {"time_s": 900}}],
            "algorithms": [{"id": "backprop"},
                           {"id": "backprop", "label": "short", "unranked": True, "budget": {"steps": 7}}]}


def test_budget_lines_show_each_problem_and_each_entry_that_differs():
    assert config.budget_lines(resolve(budget_suite())) == [
        "digits x mlp-16x1: epochs = 15; short: steps = 7 (own budget, unranked)",
        "digits x mlp-8x1: time_s = 900; short: steps = 7 (own budget, unranked)"]


def test_the_command_line_budget_replaces_every_budget_not_merged_into_the_suites():
    """`--set budget.time_s=900` on a suite of `epochs = 15`: 900 s for every trial, no epoch limit left over (a
    merged budget stopped a "900 s" trial at 15 epochs, seconds in), and no model's or entry's own budget kept."""
    trials = resolve(budget_suite(), ["budget.time_s=900"])
    assert {t.budget for t in trials} == {Budget(time_s=900)}
    assert config.budget_lines(trials) == ["digits x mlp-16x1: time_s = 900", "digits x mlp-8x1: time_s = 900"]
    both = resolve(budget_suite(), ["budget.epochs=15", "budget.time_s=900"])  # several budget.* items combine
    assert {t.budget for t in both} == {Budget(epochs=15, time_s=900)}
    assert config.budget_lines(both)[0] == "digits x mlp-16x1: epochs = 15, time_s = 900 (whichever comes first)"
