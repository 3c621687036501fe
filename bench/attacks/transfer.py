"""Transfer attack (Papernot, McDaniel & Goodfellow 2016, "Transferability in Machine Learning"; the black-box
check of Athalye et al. 2018): PGD-Linf examples crafted on a source model of the same seed, dataset and model
spec (by default the suite's reference algorithm, backprop in the built-in suites), fed to every other model of
that group. It runs after all trials (`post_run`), since it needs the sibling.

Crafting uses the trial's PGD settings (steps, step factor, restarts) with every step on every point and the last
iterate kept (`early_stop=False`): examples pushed to high loss on the source transfer better than examples just
across its boundary. All `examples` points are crafted, whatever the source predicts; a target point is robust
when the target classifies it correctly both clean and adversarial. The source's randomness is a CPU generator
seeded with the trial seed, so the examples do not depend on the device or on the order of trials.

Source choice: `robustness.transfer_source`, else the suite's `reference`: the `done` trial of the group whose label
is that name, else the first label (in sorted order) whose algorithm id is that name; every other `done` trial of
the group with `transfer` among its attacks is a target. Groups without such a trial get no transfer metrics.
Metrics added per target: `robust/transfer/<eps>`, `robust/auc/transfer`, `robust/seconds/transfer` (crafting,
shared by the group, plus this target's scoring; `robust/seconds` stays the in-trial evaluation's, so rerunning
`post_run` changes nothing), and `flag/masking/transfer-beats-white-box`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .common import attack_mode, chunked, predict
from .pgd import pgd_linf
from .robustness import accuracy_metrics, check_constraint, eps_key

if TYPE_CHECKING:
    from learnbench.store import Store
    from learnbench.trial import StoredTrial

WHITE_BOX_LINF = ("fgsm", "pgd-linf", "apgd-ce")


def craft(source: nn.Module, x: Tensor, y: Tensor, eps_grid: list[float], settings: dict,
          generator: torch.Generator) -> dict[float, Tensor]:
    """PGD-Linf examples on `source` for all points x [N, ...] at every eps (last iterate, full steps)."""
    reps, n = len(eps_grid), x.shape[0]
    xs, ys = x.repeat(reps, *([1] * (x.dim() - 1))), y.repeat(reps)  # [E N, ...], eps-major
    radii = torch.tensor(eps_grid, dtype=x.dtype, device=x.device).repeat_interleave(n)
    with attack_mode(source):
        adv = chunked(lambda a, b, e: pgd_linf(source, a, b, e, generator=generator, steps=settings["pgd_steps"],
                                               step_factor=settings["pgd_step_factor"],
                                               restarts=settings["pgd_restarts"], early_stop=False),
                      xs, ys, radii, settings["batch_size"])
    check_constraint(adv, xs, radii, "linf")
    return dict(zip(eps_grid, adv.split(n)))


def score(target: nn.Module, x: Tensor, y: Tensor, adversarial: dict[float, Tensor], chunk: int) -> dict[float, float]:
    """Robust accuracy of `target` on each eps's crafted points (correct on both clean and adversarial input)."""
    with attack_mode(target):
        clean = predict(target, x, chunk) == y
        return {eps: (clean & (predict(target, adv, chunk) == y)).float().mean().item()
                for eps, adv in adversarial.items()}


def transfer_beats_white_box(transfer: dict[float, float], metrics: dict[str, float], margin: float) -> float | None:
    """1.0 if transfer accuracy is below every white-box Linf accuracy by more than `margin` at some eps."""
    fired, checked = False, False
    for eps, acc in transfer.items():
        white = [metrics.get(f"robust/{a}/{eps_key(eps)}") for a in WHITE_BOX_LINF]
        white = [w for w in white if w is not None]
        if white:
            checked = True
            fired |= acc < min(white) - margin
    return float(fired) if checked else None


def groups(trials: list[StoredTrial]) -> dict[tuple, list[StoredTrial]]:
    """Done trials with the transfer attack on, grouped by dataset, model spec, seed and robustness settings."""
    out: dict[tuple, list[StoredTrial]] = {}
    for t in trials:
        settings = t.robustness
        if t.status != "done" or not settings.get("examples") or "transfer" not in settings.get("attacks", ()):
            continue
        key = (t.dataset, json.dumps(t.model, sort_keys=True), t.seed, json.dumps(settings, sort_keys=True))
        out.setdefault(key, []).append(t)
    return out


def source_of(group: list[StoredTrial]) -> StoredTrial | None:
    """The group's source: the trial labelled with the source name, else one whose algorithm id it is."""
    name = group[0].robustness.get("transfer_source") or group[0].reference
    for matches in ([t for t in group if t.label == name], [t for t in group if t.algorithm == name]):
        if matches:
            return min(matches, key=lambda t: (t.label, t.id))
    return None


def transfer_post_run(store: Store, run_dir: str | Path, device: torch.device, data_dir: str | None = None) -> None:
    """For each group with a source: craft once, score every other trial, add its metrics."""
    import learnbench
    from learnbench import datasets

    test_sets: dict[str, tuple[Tensor, Tensor]] = {}
    for group in groups(store.trials()).values():
        source = source_of(group)
        targets = [t for t in group if source is not None and t.id != source.id]
        if not targets:
            continue
        settings, name = source.robustness, source.dataset
        if name not in test_sets:
            splits = datasets.load(name, data_dir)
            test_sets[name] = (splits.test_x, splits.test_y)
        n = settings["examples"]
        x, y = (t[:n].to(device) for t in test_sets[name])
        started = time.perf_counter()
        model = learnbench.load_model(run_dir, source.id).to(device)
        generator = torch.Generator().manual_seed(int(source.seed))
        adversarial = craft(model, x, y, settings["eps_linf"], settings, generator)
        crafting = _elapsed(started, device)
        for target in targets:
            store.add_metrics(target.id, _target_metrics(run_dir, target, x, y, adversarial, settings,
                                                            crafting, device))


def _target_metrics(run_dir: str | Path, target: StoredTrial, x: Tensor, y: Tensor,
                    adversarial: dict[float, Tensor], settings: dict, crafting: float,
                    device: torch.device) -> dict[str, float]:
    import learnbench

    started = time.perf_counter()
    model = learnbench.load_model(run_dir, target.id).to(device)
    acc = score(model, x, y, adversarial, settings["batch_size"])
    old = target.metrics
    clean = old.get("robust/clean")
    if clean is None:
        with attack_mode(model):
            clean = (predict(model, x, settings["batch_size"]) == y).float().mean().item()
    out = accuracy_metrics("transfer", clean, acc)
    out["robust/seconds/transfer"] = crafting + _elapsed(started, device)
    flag = transfer_beats_white_box(acc, old, settings["masking_margin"])
    if flag is not None:
        out["flag/masking/transfer-beats-white-box"] = flag
    return out


def _elapsed(started: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started
