"""The machine a trial runs on: how many CPUs this process may use, how many threads each worker gets, and the
peak memory a trial used. The runner, the executors and the CLI read them."""

from __future__ import annotations

import os

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start this process's peak-memory count afresh (a trial's `cost/peak_memory_bytes`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the resident-set high-water mark (VmHWM) of this process
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory(device: torch.device) -> float:
    """Peak bytes since `reset_peak_memory`: the CUDA allocator's on a GPU, the resident set's high-water mark on
    CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, a cluster's cgroup cpuset), else all cores."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(workers: int) -> int:
    """Torch threads per worker process: the usable CPUs shared out (two threads each on two busy cores slowed a
    small model 5-13x)."""
    return max(1, usable_cpus() // max(1, workers))
