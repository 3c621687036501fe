"""Data-parallel backprop: one trial as N processes with `torch.distributed` and `DistributedDataParallel`.

A trial with `data_parallel = N` (an [[algorithms]] entry key, or `[resources] data_parallel` for every entry that
supports it) runs as rank 0, the runner's own process (the loop, the clock, evaluations, attacks, the result), and
N - 1 helper processes (`python -m learnbench.data_parallel`, started here; or Ray Train's workers with
`--executor ray`, `executor_ray.run_data_parallel_task`),
each with its own copy of the data and of the trainer. Every rank draws the same batch of B examples (the same
seeded sampler) and steps on its shard of B / N rows; DDP averages the gradients in the backward pass (gloo on
CPU, NCCL on CUDA), so the update is the one of a single process on the whole batch, up to the summation order of
floating point. Before each step rank 0 broadcasts one integer, go on (1) or stop (0): only rank 0 reads the clock
and the budget, and evaluation runs there, off the clock, while the helpers wait.

Cost counts all processes: the trial's seconds are rank 0's wall clock of the steps (the broadcast and the
all-reduce included), examples and example-passes are B per step (N shards of B / N), and the work a trainer
declares outside the model (the optimizer's update, on every rank) is multiplied by N.

Which trainers: those whose `supports_data_parallel` is true (a property of the built trainer): backprop with a
first-order optimizer. L-BFGS's line search and K-FAC's factors would be computed per shard and let the ranks
disagree, and the feedback-alignment family and adversarial training step through more than one forward/backward
of the model. A helper that dies makes rank 0's next collective raise, or, while it is still starting, rank 0's wait
for it to start (`wait_until_ready`): the trial fails (nothing is written but the failed trial's row); rank 0 stops
and kills its helpers whatever happens to it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .spec import Batch, StepStats, TaskInfo

TIMEOUT = datetime.timedelta(minutes=10)
"""How long a collective waits for a missing peer (a helper that hangs rather than dies)."""


class DataParallelTrainer:
    """A trainer seen by the runner on rank 0 (and by the helpers): wraps the model in DDP, steps on this rank's
    shard of each batch, and broadcasts go-on before each step."""

    def __init__(self, trainer: Any, world_size: int, rank: int):
        self.trainer, self.world_size, self.rank = trainer, world_size, rank

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        device_ids = [task.device.index or 0] if task.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids)  # broadcasts rank 0's initial weights
        self.trainer.setup(self.ddp, task, generator)
        self._go = torch.ones(1, dtype=torch.int64, device=task.device if task.device.type == "cuda" else "cpu")

    def step(self, batch: Batch) -> StepStats:
        self._go.fill_(1)
        dist.broadcast(self._go, src=0)
        stats = self.trainer.step(self.shard(batch))
        n = self.world_size
        return StepStats(loss=stats.loss, forward_passes=stats.forward_passes * n,
                         backward_passes=stats.backward_passes * n, extra_flops=stats.extra_flops * n,
                         metrics=stats.metrics)

    def shard(self, batch: Batch) -> Batch:
        rows = batch.y.shape[0] // self.world_size
        part = slice(self.rank * rows, (self.rank + 1) * rows)
        return Batch(batch.x[part], batch.y[part])

    def eval_model(self) -> nn.Module:
        model = self.trainer.eval_model()
        return model.module if isinstance(model, DistributedDataParallel) else model

    def stop(self) -> None:
        """Rank 0: tell the helpers the loop is over."""
        self._go.fill_(0)
        dist.broadcast(self._go, src=0)

    def wait_for_go(self) -> bool:
        """Helpers: whether rank 0 takes another step."""
        dist.broadcast(self._go, src=0)
        return bool(self._go.item())

    def __getattr__(self, name: str) -> Any:  # the wrapped trainer's own attributes (pseudo_gradient_model, ...)
        if name == "trainer":
            raise AttributeError(name)
        return getattr(self.trainer, name)


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def local_group(trial_config: dict[str, Any], data_dir: str | None, device: torch.device) -> Iterator[None]:
    """Rank 0 of a local data-parallel trial: start the N - 1 helpers (`python -m learnbench.data_parallel`), join
    the process group through a rendezvous file, yield, then take the group down and end every helper, whether the
    block finished or raised."""
    world = int(trial_config["data_parallel"])
    with tempfile.TemporaryDirectory(prefix="learnbench-ddp-") as folder:
        rendezvous, config_file = Path(folder) / "rendezvous", Path(folder) / "trial.json"
        config_file.write_text(json.dumps(trial_config))
        threads = max(1, torch.get_num_threads() // world)  # the trial's threads shared out, rank 0 included
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        ready = [Path(folder) / f"ready-{rank}" for rank in range(1, world)]
        helpers = [subprocess.Popen([sys.executable, "-m", "learnbench.data_parallel", "--rank", str(rank),
                                     "--rendezvous", str(rendezvous), "--trial", str(config_file),
                                     "--threads", str(threads), "--parent", str(os.getpid()),
                                     "--ready", str(ready[rank - 1])] + (["--data-dir", data_dir] if data_dir else []),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for rank in range(1, world)]
        try:
            wait_until_ready(helpers, ready)
            dist.init_process_group(backend(device), init_method=f"file://{rendezvous}", rank=0, world_size=world,
                                    timeout=TIMEOUT)
            yield
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            _end(helpers)
            torch.set_num_threads(previous)


def wait_until_ready(helpers: list[subprocess.Popen], ready: list[Path], timeout: float = TIMEOUT.total_seconds(),
                     poll: float = 0.05) -> None:
    """Return once every helper has written its ready file (its imports done, about to join the group); raise at
    once if one exits first. Without this, a helper that dies while starting (killed, or an import error) would
    leave rank 0 waiting in `init_process_group` for the whole TIMEOUT: a peer that never joined is not a closed
    connection. (A helper dying in the instant between its ready file and joining still costs the timeout.)"""
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in ready):
        for rank, (helper, path) in enumerate(zip(helpers, ready), start=1):
            if not path.exists() and helper.poll() is not None:
                lines = (helper.stderr.read() if helper.stderr else b"").decode(errors="replace").strip().splitlines()
                raise RuntimeError(f"data-parallel helper rank {rank} exited with code {helper.returncode} before "
                                   f"joining the group" + (f": {lines[-1]}" if lines else ""))
        if time.monotonic() > deadline:
            raise RuntimeError(f"data-parallel helpers not ready after {timeout:.0f} s")
        time.sleep(poll)


def _end(helpers: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 10
    for helper in helpers:
        try:
            helper.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
        if helper.stderr is not None:
            helper.stderr.close()


def helper_loop(trial_config: dict[str, Any], rank: int, data_dir: str | None, device: torch.device) -> None:
    """A helper rank (the group already joined) on `device`: build what rank 0 built, from the same seeds, and
    step on this rank's shard of every batch until rank 0 says stop."""
    from .runner import Sampler, _construct, _generator, prepare
    from .trial import Trial

    trial = Trial.from_config(trial_config)
    splits, entry, model, task = prepare(trial, data_dir, device)
    trainer = DataParallelTrainer(_construct(entry.cls, trial.hparams), trial.data_parallel, rank)
    trainer.setup(model, task, _generator(trial.seed, 0, device))
    sampler = Sampler(splits.train_x, splits.train_y, trial.hparams["batch_size"], _generator(trial.seed, 1, device))
    while trainer.wait_for_go():
        trainer.trainer.step(trainer.shard(sampler.next()))


def _watch_parent(parent: int) -> None:
    """End this helper when rank 0's process is gone (killed): nothing else would wake a helper blocked in a
    collective before the timeout."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learnbench.data_parallel")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--rendezvous", required=True)
    parser.add_argument("--trial", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--ready", help="a file to create once started, just before joining the group")
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True).start()
    torch.set_num_threads(args.threads)
    config = json.loads(Path(args.trial).read_text())
    device = torch.device(config.get("device", "cpu"))
    if device.type == "cuda":  # one GPU per process: rank r on cuda:r (rank 0, the runner, on cuda:0)
        device = torch.device("cuda", args.rank)
        torch.cuda.set_device(device)
    if args.ready:
        Path(args.ready).touch()
    dist.init_process_group(backend(device), init_method=f"file://{args.rendezvous}", rank=args.rank,
                            world_size=int(config["data_parallel"]), timeout=TIMEOUT)
    try:
        helper_loop(config, args.rank, args.data_dir, device)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
