"""The command line: every bad input is one clear line on stderr, exit code 2, and nothing written."""

import json
import os
import sqlite3
import textwrap
from pathlib import Path

import pytest

from conftest import TINY_SUITE, run_cli
from learnbench.cli import main


def assert_usage_error(capsys, argv, match, out_dir=None):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("learnbench: error:"), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    if out_dir is not None:
        assert not Path(out_dir).exists(), "a run directory was left behind"


def suite_file(tmp_path, text=TINY_SUITE, name="s.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize("argv_tail,match", [
    (["no-such-suite"], "unknown suite"),
    (["{suite}", "--algorithms", "hebbian"], "nor installed"),
    (["{suite}", "--datasets", "imagenet"], "unknown dataset"),
    (["{suite}", "--set", "model.kind=transformer"], "unknown model kind"),
    (["{suite}", "--set", "budget.steps=0"], "positive number"),
    (["{suite}", "--set", "budget.epochs=-2"], "positive number"),
    (["{suite}", "--set", "nonsense.key=1"], "unknown --set key"),
    (["{suite}", "--set", "backprop.lr=fast"], "lr must be"),
    # values each trainer's `validate` refuses, checked before anything is written
    (["{suite}", "--set", "backprop.lr=-0.1"], "lr must be positive"),
    (["{suite}", "--set", "backprop.schedule=sawtooth"], "schedule must be one of"),
    (["{suite}", "--algorithms", "openai-es", "--set", "openai-es.popsize=7"], "popsize must be even"),
    (["{suite}", "--set", "resources.actors=-1"], "actors must be a non-negative integer"),
    (["{suite}", "--algorithms", "snes", "--set", "snes.workers=2"], "unknown hyper-parameter(s) workers"),
    (["{suite}", "--algorithms", "ga", "--set", "ga.elites=99"], "elites < popsize"),
    (["{suite}", "--algorithms", "kolen-pollack", "--set", "kolen-pollack.decay=-1"], "decay must be >= 0"),
    (["{suite}", "--seeds", "0"], "--seeds"),
    (["{suite}", "--seeds", "three"], "invalid int value"),
    (["{suite}", "--workers", "0"], "--workers"),
    (["{suite}", "--frobnicate"], "unrecognized arguments"),
    (["{suite}", "--device", "tpu"], "invalid choice"),
])
def test_bad_run_arguments(tmp_path, capsys, argv_tail, match):
    out = tmp_path / "out"
    argv = ["run", *[a.format(suite=suite_file(tmp_path)) for a in argv_tail], "--out", str(out)]
    assert_usage_error(capsys, argv, match, out)


@pytest.mark.parametrize("text,match", [
    ("name = [broken\n", "malformed TOML"),
    (TINY_SUITE.replace("steps = 40", 'steps = "forty"'), "positive number"),
    (TINY_SUITE.replace("seeds = 1", "seeds = -1"), "seeds"),
    (TINY_SUITE.replace("hidden = [16]", 'hidden = "wide"'), "list of integers"),
    (TINY_SUITE.replace('batch_size = 32', 'batch_size = "big"'), "batch_size must be"),
    (TINY_SUITE + "\n[budget2]\nx=1\n", "unknown key"),
])
def test_bad_suite_files(tmp_path, capsys, text, match):
    out = tmp_path / "out"
    assert_usage_error(capsys, ["run", suite_file(tmp_path, text), "--out", str(out)], match, out)


def test_unwritable_output_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root may write anywhere; /proc refuses new folders even to root
            target, match = Path("/proc/learnbench-test-run"), "cannot create the run directory"
        else:
            target, match = locked / "run", "not writable"
        assert_usage_error(capsys, ["run", suite_file(tmp_path), "--out", str(target)], match, target)
    finally:
        locked.chmod(0o700)


def test_output_path_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert_usage_error(capsys, ["run", suite_file(tmp_path), "--out", str(target)], "not a folder")


@pytest.mark.parametrize("command", [["show"], ["show", "--json"], ["report"]])
def test_show_and_report_on_a_folder_that_is_not_a_run(tmp_path, capsys, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_usage_error(capsys, [command[0], str(empty), *command[1:]], "not a learnbench run directory")


def test_show_on_a_corrupt_store(tmp_path, capsys):
    (tmp_path / "results.sqlite").write_bytes(b"this is not sqlite" * 100)
    assert_usage_error(capsys, ["show", str(tmp_path)], "not a readable learnbench results store")


@pytest.mark.slow
def test_run_show_json_and_resume(tmp_path):
    out = tmp_path / "run"
    first = run_cli("run", suite_file(tmp_path), "--out", str(out), "--quiet")
    assert first.returncode == 0, first.stderr
    shown = run_cli("show", str(out), "--json")
    data = json.loads(shown.stdout)
    (trial,) = data["trials"]
    assert set(trial) >= {"id", "algorithm", "dataset", "model", "seed", "status", "hparams", "error", "metrics"}
    assert trial["status"] == "done" and trial["model"] == "mlp-16x1" and trial["error"] is None
    assert trial["metrics"]["cost/steps"] == 40 and 0 < trial["metrics"]["test/accuracy"] <= 1
    assert (out / "models" / f"{trial['id']}.safetensors").is_file()
    again = run_cli("run", suite_file(tmp_path), "--out", str(out), "--quiet")
    assert again.returncode == 0 and "1 already finished" in again.stderr
    db = sqlite3.connect(out / "results.sqlite")
    assert db.execute("SELECT count(*) FROM trials").fetchone()[0] == 1


def test_second_process_on_the_same_run_dir_is_refused(tmp_path, capsys):
    from learnbench.workspace import RunDirLock
    out = tmp_path / "run"
    out.mkdir()
    with RunDirLock(out):
        assert_usage_error(capsys, ["run", suite_file(tmp_path), "--out", str(out)], "in use by another")


@pytest.mark.slow
def test_failed_trials_give_exit_code_1(tmp_path):
    from plugin_cases import BROKEN
    plugin = tmp_path / "bad.py"
    plugin.write_text(BROKEN)
    text = TINY_SUITE.replace('id = "backprop"', 'id = "raises"')
    result = run_cli("run", suite_file(tmp_path, text), "--plugin", str(plugin), "--out", str(tmp_path / "r"),
                     "--quiet")
    assert result.returncode == 1, result.stderr
    assert "1 trial(s) failed" in result.stderr


@pytest.mark.slow
def test_list_commands():
    for what in ("algorithms", "datasets", "models", "suites"):
        result = run_cli("list", what)
        assert result.returncode == 0, result.stderr
    assert "backprop" in run_cli("list", "algorithms").stdout
    assert "quick" in run_cli("list", "suites").stdout


@pytest.fixture
def isolated_data(tmp_path, monkeypatch, mnist_dir):
    """A data root of our own, no other roots, and a mirror that refuses connections: nothing can be downloaded."""
    monkeypatch.delenv("LEARNBENCH_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LEARNBENCH_MIRROR", "http://127.0.0.1:9")
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    for f in (mnist_dir / "mnist").iterdir():
        (root / "mnist" / f.name).write_bytes(f.read_bytes())
    return root


MNIST_SUITE = TINY_SUITE.replace('datasets = ["digits"]', 'datasets = ["mnist"]')


@pytest.mark.parametrize("damage,match", [
    ("missing", "not found"),
    ("corrupt", "SHA-256 mismatch"),
    ("truncated", "truncated"),
])
def test_bad_dataset_files(tmp_path, capsys, isolated_data, damage, match):
    target = isolated_data / "mnist" / "t10k-labels-idx1-ubyte.gz"
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:2000])
    else:
        import gzip
        raw = bytearray(gzip.decompress(target.read_bytes()))
        raw[100] ^= 0xFF
        target.write_bytes(gzip.compress(bytes(raw)))
    out = tmp_path / "out"
    assert_usage_error(capsys, ["run", suite_file(tmp_path, MNIST_SUITE), "--data-dir", str(isolated_data),
                                "--out", str(out)], match, out)


@pytest.mark.slow
def test_data_dir_reaches_the_post_run_transfer_attack(tmp_path, isolated_data):
    """--data-dir (no LEARNBENCH_DATA) must serve every phase, the transfer attack after the trials included."""
    text = MNIST_SUITE.replace("examples = 0", 'examples = 20\nattacks = ["fgsm", "transfer"]') \
        + '\n[[algorithms]]\nid = "fa"\nbatch_size = 32\n'
    out = tmp_path / "out"
    result = run_cli("run", suite_file(tmp_path, text), "--data-dir", str(isolated_data), "--out", str(out),
                     "--quiet", "--workers", "1")
    assert result.returncode == 0, result.stderr
    data = json.loads(run_cli("show", str(out), "--json").stdout)
    fa = next(t for t in data["trials"] if t["algorithm"] == "fa")
    assert "robust/transfer/0.1" in fa["metrics"]
