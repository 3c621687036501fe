"""A crash never loses a finished trial: SIGKILL a running suite, rerun it, check the store."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

SUITE = """
name = "killme"
datasets = ["digits"]
seeds = 6
[[models]]
kind = "mlp"
hidden = [32]
[budget]
steps = 400
[eval]
points = 5
[robustness]
examples = 0
[[algorithms]]
id = "backprop"
batch_size = 32
"""


def _done(db_path):
    if not db_path.exists():
        return {}
    db = sqlite3.connect(db_path, timeout=10)
    try:
        return dict(db.execute("SELECT id, finished FROM trials WHERE status='done'").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


@pytest.mark.slow
def test_sigkill_then_rerun_skips_finished_trials(tmp_path):
    suite = tmp_path / "killme.toml"
    suite.write_text(textwrap.dedent(SUITE))
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "learnbench.cli", "run", str(suite), "--out", str(out), "--quiet", "--workers", "2"]
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(_done(out / "results.sqlite")) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-suite
    proc.wait()
    before = _done(out / "results.sqlite")
    assert 2 <= len(before) < 6, "the suite should have been killed part-way"

    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(before)} already finished)" in rerun.stderr
    db = sqlite3.connect(out / "results.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    after = dict(db.execute("SELECT id, finished FROM trials WHERE status='done'").fetchall())
    assert len(after) == 6 and db.execute("SELECT count(*) FROM trials").fetchone()[0] == 6
    assert all(after[t] == finished for t, finished in before.items()), "a finished trial was rerun"
    duplicates = db.execute("SELECT count(*) FROM (SELECT trial, name FROM metrics GROUP BY trial, name "
                            "HAVING count(*) > 1)").fetchone()[0]
    assert duplicates == 0
    per_trial = db.execute("SELECT trial, count(*) FROM curves WHERE metric='test/accuracy' GROUP BY trial").fetchall()
    assert len(per_trial) == 6 and {n for _, n in per_trial} == {6}  # points + 1 each, none doubled
