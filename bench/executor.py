"""Running trials: in this process (one worker) or in spawned worker processes (`--workers N`).

The driver alone writes the store: workers send back JSON results over pipes (never pickled objects) and save
weights themselves. Each worker gets `cores // workers` threads: on a 2-core machine two processes with two threads
each slow a small model 5-13x. A worker that dies (killed, out of memory) fails its trial with the reason, is
replaced, and the run goes on.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from .store import Store

def run_local(trials: list[dict[str, Any]], store: Store, run_dir: str, data_dir: str | None, workers: int,
              threads: int, progress: "ProgressView") -> None:
    """Run `trials` (already registered as pending) and record each result as it arrives."""
    if not trials:
        return
    if workers <= 1:
        _run_inline(trials, store, run_dir, data_dir, threads, progress)
    else:
        _run_pool(trials, store, run_dir, data_dir, workers, threads, progress)


def record(store: Store, result: dict[str, Any]) -> None:
    store.finish_trial(result["id"], result["status"], result["error"], result["metrics"],
                       [tuple(row) for row in result["curves"]], result["provenance"])


def _run_inline(trials, store, run_dir, data_dir, threads, progress) -> None:
    import torch

    from .runner import run_trial

    torch.set_num_threads(threads)
    for trial in trials:
        store.mark_running(trial["id"])
        progress.start(trial)
        result = run_trial(trial, run_dir, data_dir, on_progress=lambda f, t=trial: progress.update(t["id"], f))
        record(store, result)
        progress.finish(trial, result["status"])


def _run_pool(trials, store, run_dir, data_dir, workers, threads, progress) -> None:
    ctx = mp.get_context("spawn")  # fork after torch has started threads is unsafe
    queue = list(trials)
    pool: dict[int, dict[str, Any]] = {}  # slot -> {"process", "conn", "trial"}

    def launch(slot: int) -> None:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, run_dir, data_dir, threads), daemon=True)
        proc.start()
        child.close()
        pool[slot] = {"process": proc, "conn": parent, "trial": None}

    def dispatch(slot: int) -> None:
        if queue:
            trial = queue.pop(0)
            pool[slot]["trial"] = trial
            store.mark_running(trial["id"])
            progress.start(trial)
            pool[slot]["conn"].send_bytes(json.dumps(trial).encode())

    for slot in range(min(workers, len(trials))):
        launch(slot)
        dispatch(slot)
    try:
        while any(w["trial"] is not None for w in pool.values()):
            ready = wait([w["conn"] for w in pool.values()] + [w["process"].sentinel for w in pool.values()], 1.0)
            for slot, worker in list(pool.items()):
                if worker["conn"] in ready or worker["process"].sentinel in ready:
                    _service(slot, worker, store, progress, launch, dispatch)
    finally:
        for worker in pool.values():
            if worker["process"].is_alive():
                worker["conn"].send_bytes(b"stop")
        for worker in pool.values():
            worker["process"].join(timeout=5)
            if worker["process"].is_alive():
                worker["process"].kill()


def _service(slot: int, worker: dict, store: Store, progress, launch, dispatch) -> None:
    """Read what a worker sent (progress or a result), or fail its trial if it died."""
    conn, trial = worker["conn"], worker["trial"]
    try:
        while conn.poll():
            message = json.loads(conn.recv_bytes())
            if message["kind"] == "progress":
                progress.update(message["id"], message["fraction"])
            else:
                record(store, message["result"])
                progress.finish(trial, message["result"]["status"])
                worker["trial"] = None
                dispatch(slot)
                return
    except (EOFError, OSError):
        pass
    if not worker["process"].is_alive() and trial is not None:
        code = worker["process"].exitcode
        killed = f", killed by signal {-code}" if code and code < 0 else ""
        reason = f"worker process died (exit code {code}{killed})"
        record(store, {"id": trial["id"], "status": "failed", "error": reason, "metrics": {}, "curves": [],
                       "provenance": {}})
        progress.finish(trial, "failed")
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
        trial = json.loads(message)
        last = [0.0]

        def report(fraction: float, trial_id: str = trial["id"]) -> None:
            if time.monotonic() - last[0] > 0.5 or fraction >= 1.0:  # at most two progress messages a second
                last[0] = time.monotonic()
                conn.send_bytes(json.dumps({"kind": "progress", "id": trial_id, "fraction": fraction}).encode())

        result = run_trial(trial, run_dir, data_dir, on_progress=report)
        conn.send_bytes(json.dumps({"kind": "result", "result": result}).encode())


class ProgressView:
    """Progress bars (tqdm, on stderr): one for the suite, one per trial in hand; silent when disabled."""

    def __init__(self, total: int, done: int, enabled: bool):
        from tqdm import tqdm

        self.enabled = enabled
        self.suite = tqdm(total=total, initial=done, desc="suite", unit="trial", disable=not enabled,
                          position=0, dynamic_ncols=True)
        self.bars: dict[str, Any] = {}
        self.failed = 0

    def start(self, trial: dict[str, Any]) -> None:
        from tqdm import tqdm

        desc = f"{trial['label']} {trial['dataset']} {trial['model_label']} s{trial['seed']}"
        self.bars[trial["id"]] = tqdm(total=100, desc=desc, unit="%", leave=False, disable=not self.enabled,
                                      position=1 + len(self.bars), dynamic_ncols=True,
                                      bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")

    def update(self, trial_id: str, fraction: float) -> None:
        bar = self.bars.get(trial_id)
        if bar is not None:
            bar.n = int(100 * fraction)
            bar.refresh()

    def finish(self, trial: dict[str, Any], status: str) -> None:
        bar = self.bars.pop(trial["id"], None)
        if bar is not None:
            bar.close()
        self.failed += status in ("failed", "diverged")
        self.suite.update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.suite.close()


def default_workers(n_trials: int, device: str) -> int:
    if device.startswith("cuda"):
        return 1
    from .runner import usable_cpus

    return max(1, min(usable_cpus(), n_trials))
