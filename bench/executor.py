"""Running trials: in this process (one worker) or in spawned worker processes (`--workers N`).

The driver alone writes the store: workers send back JSON results over pipes (never pickled objects) and save
weights themselves. Each worker gets `cores // workers` threads: on a 2-core machine two processes with two threads
each slow a small model 5-13x. A worker that dies (killed, out of memory) fails its trial with the reason, is
replaced, and the run goes on.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from .store import Store
from .trial import Trial, TrialResult


def run_local(trials: list[Trial], store: Store, run_dir: str, data_dir: str | None, workers: int,
              threads: int, progress: "ProgressView") -> None:
    """Run `trials` (already registered as pending) and record each result as it arrives."""
    if not trials:
        return
    if workers <= 1:
        _run_inline(trials, store, run_dir, data_dir, threads, progress)
    else:
        _run_pool(trials, store, run_dir, data_dir, workers, threads, progress)


def _run_inline(trials, store, run_dir, data_dir, threads, progress) -> None:
    import torch

    from .runner import run_trial

    torch.set_num_threads(threads)
    for trial in trials:
        store.mark_running(trial.id)
        progress.start(trial)
        result = run_trial(trial, run_dir, data_dir,
                           on_progress=lambda f, loss, t=trial: progress.update(t.id, f, loss))
        store.finish_trial(result)
        progress.finish(trial, result.status, result)


def _run_pool(trials, store, run_dir, data_dir, workers, threads, progress) -> None:
    ctx = mp.get_context("spawn")  # fork after torch has started threads is unsafe
    queue = list(trials)
    pool: dict[int, _Worker] = {}

    def launch(slot: int) -> None:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, run_dir, data_dir, threads), daemon=True)
        proc.start()
        child.close()
        pool[slot] = _Worker(proc, parent)

    def dispatch(slot: int) -> None:
        if queue:
            trial = queue.pop(0)
            pool[slot].trial = trial
            store.mark_running(trial.id)
            progress.start(trial)
            pool[slot].conn.send_bytes(json.dumps(trial.config()).encode())

    for slot in range(min(workers, len(trials))):
        launch(slot)
        dispatch(slot)
    try:
        while any(w.trial is not None for w in pool.values()):
            ready = wait([w.conn for w in pool.values()] + [w.process.sentinel for w in pool.values()], 1.0)
            for slot, worker in list(pool.items()):
                if worker.conn in ready or worker.process.sentinel in ready:
                    _service(slot, worker, store, progress, launch, dispatch)
    finally:
        for worker in pool.values():
            if worker.process.is_alive():
                worker.conn.send_bytes(b"stop")
        for worker in pool.values():
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()


@dataclass(eq=False)
class _Worker:
    """A worker process, the driver's end of its pipe, and the trial it is running (None: idle)."""

    process: Any
    conn: Connection
    trial: Trial | None = None


def _service(slot: int, worker: _Worker, store: Store, progress, launch, dispatch) -> None:
    """Read what a worker sent (progress or a result), or fail its trial if it died."""
    conn, trial = worker.conn, worker.trial
    try:
        while conn.poll():
            message = json.loads(conn.recv_bytes())
            if message["kind"] == "progress":
                progress.update(message["id"], message["fraction"], message.get("loss"))
            else:
                result = TrialResult.from_json_dict(message["result"])
                store.finish_trial(result)
                progress.finish(trial, result.status, result)
                worker.trial = None
                dispatch(slot)
                return
    except (EOFError, OSError):
        pass
    if not worker.process.is_alive() and trial is not None:
        code = worker.process.exitcode
        killed = f", killed by signal {-code}" if code and code < 0 else ""
        lost = TrialResult.lost(trial.id, f"worker process died (exit code {code}{killed})")
        store.finish_trial(lost)
        progress.finish(trial, "failed", lost)
        launch(slot)
        dispatch(slot)


def _worker_main(conn: Connection, run_dir: str, data_dir: str | None, threads: int) -> None:
    import torch

    from .runner import run_trial

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    while True:
        message = conn.recv_bytes()
        if message == b"stop":
            return
        trial = Trial.from_config(json.loads(message))
        last = [0.0]

        def report(fraction: float, loss: float | None, trial_id: str = trial.id) -> None:
            if time.monotonic() - last[0] > 0.5 or fraction >= 1.0:  # at most two progress messages a second
                last[0] = time.monotonic()
                conn.send_bytes(json.dumps({"kind": "progress", "id": trial_id, "fraction": fraction,
                                            "loss": loss}).encode())

        result = run_trial(trial, run_dir, data_dir, on_progress=report)
        conn.send_bytes(json.dumps({"kind": "result", "result": result.json_dict()}).encode())


class ProgressView:
    """Progress bars (tqdm, on stderr): one for the suite, one per trial in hand with its latest training loss;
    silent when disabled. With `lines` (stderr is a log file, not a terminal) one line per finished trial instead.
    Every executor calls `finish` right after the store has recorded the trial: `on_finish(trial, result)` (the
    experiment trackers, `learnbench.trackers`) runs there, in this process, whatever the executor."""

    def __init__(self, total: int, done: int, enabled: bool, lines: bool = False,
                 on_finish: Callable[[Trial, TrialResult], None] | None = None):
        from tqdm import tqdm

        self.enabled, self.lines, self.total, self.done = enabled, lines and not enabled, total, done
        self.on_finish = on_finish
        self.suite = tqdm(total=total, initial=done, desc="suite", unit="trial", disable=not enabled,
                          position=0, dynamic_ncols=True)
        self.bars: dict[str, Any] = {}
        self.started: dict[str, float] = {}
        self.failed = 0

    def start(self, trial: Trial) -> None:
        from tqdm import tqdm

        self.started[trial.id] = time.monotonic()
        self.bars[trial.id] = tqdm(total=100, desc=trial.describe(), unit="%", leave=False, disable=not self.enabled,
                                      position=1 + len(self.bars), dynamic_ncols=True,
                                      bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}{postfix}")

    def update(self, trial_id: str, fraction: float, loss: float | None = None) -> None:
        bar = self.bars.get(trial_id)
        if bar is not None:
            bar.n = int(100 * fraction)
            if loss is not None:
                bar.set_postfix_str(f"loss {loss:.4g}", refresh=False)
            bar.refresh()

    def finish(self, trial: Trial, status: str, result: TrialResult | None = None) -> None:
        bar = self.bars.pop(trial.id, None)
        if bar is not None:
            bar.close()
        self.failed += status in ("failed", "diverged")
        self.done += 1
        self.suite.update(1)
        if self.lines:
            wall = time.monotonic() - self.started.pop(trial.id, time.monotonic())
            print(f"learnbench: [{self.done}/{self.total}] {finished_line(trial, status, result, wall)}",
                  file=sys.stderr, flush=True)
        if self.on_finish is not None and result is not None:
            self.on_finish(trial, result)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.suite.close()


def finished_line(trial: Trial, status: str, result: TrialResult | None, wall_s: float) -> str:
    """`backprop digits mlp-16x1 s0: done, test accuracy 0.9417, 1.2 s training, 1.9 s wall` (a log line)."""
    metrics = result.metrics if result is not None else {}
    # tuning searches never read the test split
    split = "val" if "val/accuracy" in metrics and "test/accuracy" not in metrics else "test"
    accuracy = metrics.get(f"{split}/accuracy")
    parts = [status, f"{split} accuracy " + ("-" if accuracy is None else f"{accuracy:.4f}")]
    if "cost/train_seconds" in metrics:
        parts.append(f"{metrics['cost/train_seconds']:.1f} s training")
    parts.append(f"{wall_s:.1f} s wall")
    error = (result.error or "").strip().splitlines() if result is not None else []
    if status != "done" and error:
        parts.append(error[-1][:200])  # a traceback's last line names the exception
    return f"{trial.describe()}: " + ", ".join(parts)


def default_workers(n_trials: int, device: str) -> int:
    if device.startswith("cuda"):
        return 1
    from .machine import usable_cpus

    return max(1, min(usable_cpus(), n_trials))
