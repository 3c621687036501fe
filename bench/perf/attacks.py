"""PGD-Linf through learnbench against the Adversarial Robustness Toolbox, on the same model and points, alternated.

The model is an MNIST MLP 784-256-256-10 trained here with learnbench's backprop (Adam, `--epochs`), the points the
first `--examples` test images. Both sides run the same work: Madry's PGD-Linf with a uniform random start and
`--steps` steps of 2.5 * eps / steps, every step on every point, the last iterate kept, in one batch:

* ART: `ProjectedGradientDescentPyTorch` on a `PyTorchClassifier` (`norm=inf`, `num_random_init=1`,
  `batch_size = --examples`), which takes numpy arrays and computes each step's input gradient with a full
  `loss.backward()` (weight gradients included);
* learnbench: `pgd_linf(..., early_stop=False)` inside `attack_mode` (weights frozen, `torch.autograd.grad` with
  respect to the input only, no numpy round trip).

A third row times learnbench's default PGD (`early_stop=True`: a point leaves the batch once misclassified, which
changes no result) for information; the ratio is taken on the same work. Robust accuracy counts a point when it is
classified correctly both clean and adversarial. The first repeat of each side is a warm-up and is not counted.

Second table, the standard: learnbench's `preset = "standard"` (APGD-CE, APGD-T, FAB-T, Square with 5,000
queries, each on the points the earlier ones left; `learnbench.attacks.ensemble`) against torchattacks'
`AutoAttack(norm="Linf", version="standard")`, the same four attacks run the same way, on the same model and
points at each `--standard-eps`, alternated, `--standard-repeats` times each (no warm-up: each takes seconds).
torchattacks' class runs APGD, APGD-T and FAB for 10 iterations (its attacks' default), where the paper and
fra31/auto-attack run 100, as learnbench does: a second row runs its same four classes at 100 iterations, the same
work, and the speed goal is read there. The learnbench time is the ensemble's own (`robust/seconds/standard`), the
masking checks excluded; the worst-case robust accuracy of each is printed beside it. Needs ART and torchattacks: `pip install 'learnbench[peers]'`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from tabulate import tabulate
from torch import nn

from learnbench.algorithms.backprop import Backprop
from learnbench.attacks import attack_mode, pgd_linf
from learnbench.attacks.robustness import evaluate, resolve_settings
from learnbench.errors import UsageError
from learnbench.perf._common import MLP_256, load_data, median_ratio, seeded_model, sync
from learnbench.spec import Batch, TaskInfo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="mnist", help="the issue's figures are on mnist")
    parser.add_argument("--examples", type=int, default=1000, help="test points attacked (one batch)")
    parser.add_argument("--eps", type=float, default=0.1, help="Linf radius (pixels in [0, 1])")
    parser.add_argument("--steps", type=int, default=40, help="PGD steps (Madry et al.: 40)")
    parser.add_argument("--repeats", type=int, default=5, help="counted repeats per side (after one warm-up)")
    parser.add_argument("--epochs", type=int, default=2, help="backprop epochs to train the attacked MLP")
    parser.add_argument("--standard-eps", type=float, nargs="*", default=[0.1, 0.3],
                        help="eps of the standard-preset vs torchattacks AutoAttack table (none: skip it)")
    parser.add_argument("--standard-repeats", type=int, default=2, help="alternated repeats per side")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data-dir", default=None)


def main(args: argparse.Namespace) -> int:
    try:
        import torchattacks
        from art.attacks.evasion import ProjectedGradientDescentPyTorch
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        raise UsageError("learnbench perf attacks compares against ART and torchattacks: "
                         "pip install 'learnbench[peers]'") from None
    device, data = load_data(args, args.dataset)
    model = _train(data, args.epochs, device)
    x, y = data.test_x[:args.examples], data.test_y[:args.examples]
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(data.input_shape),
                                   nb_classes=data.n_classes, clip_values=(0.0, 1.0),
                                   device_type="gpu" if device.type == "cuda" else "cpu")
    art_attack = ProjectedGradientDescentPyTorch(classifier, norm=np.inf, eps=args.eps,
                                                 eps_step=2.5 * args.eps / args.steps, max_iter=args.steps,
                                                 num_random_init=1, batch_size=args.examples, verbose=False)
    sides = {
        "ART ProjectedGradientDescentPyTorch": lambda seed: _art(art_attack, x, y, seed),
        "learnbench pgd_linf (same work)": lambda seed: _ours(model, x, y, args, seed, early_stop=False),
        "learnbench pgd_linf (default, early stop)": lambda seed: _ours(model, x, y, args, seed, early_stop=True),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    accs: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats + 1):
        for name, fn in sides.items():
            seconds, adv = _timed(fn, repeat, device)
            if repeat > 0:
                times[name].append(seconds)
                accs[name].append(_robust_accuracy(model, x, y, adv))
    _print(args, device, model, x, y, times, accs)
    if args.standard_eps:
        _standard_table(torchattacks, model, x, y, args, data.n_classes)
    return 0


def _standard_table(torchattacks, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
                    n_classes: int) -> None:
    """learnbench's standard preset vs torchattacks' AutoAttack (standard, Linf), alternated per eps: the class as
    shipped, whose APGD, APGD-T and FAB run 10 iterations, and the same four attacks at the paper's and the
    reference code's 100 (the work learnbench does)."""
    sides = {"torchattacks AutoAttack (as shipped: 10 steps)": lambda eps, seed: torchattacks.AutoAttack(
                 model, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=seed),
             "torchattacks, 100 steps (same work)": lambda eps, seed: _autoattack_100(torchattacks, model, eps,
                                                                                      n_classes, seed)}
    rows = []
    for eps in args.standard_eps:
        ours_s, ours_acc = [], []
        theirs = {name: ([], []) for name in sides}
        for repeat in range(args.standard_repeats):
            settings = resolve_settings({"preset": "standard", "attacks": [], "eps_linf": [eps],
                                         "examples": x.shape[0]}, args.dataset)
            metrics = evaluate(model, x, y, settings, generator=torch.Generator(device=x.device).manual_seed(repeat))
            ours_s.append(metrics["robust/seconds/standard"])
            ours_acc.append(metrics[f"robust/worst-case/linf/{eps:g}"])
            for name, make in sides.items():
                attack = make(eps, repeat)
                seconds, adv = _timed(lambda _: attack(x, y), repeat, x.device)
                theirs[name][0].append(seconds)
                theirs[name][1].append(_robust_accuracy(model, x, y, adv))
        rows.append((f"{eps:g}", "learnbench standard preset", statistics.median(ours_s), "",
                     statistics.mean(ours_acc), ""))
        for name, (seconds, accs) in theirs.items():
            rows.append(("", name, statistics.median(seconds), median_ratio(ours_s, seconds), statistics.mean(accs),
                         100 * (statistics.mean(ours_acc) - statistics.mean(accs))))
    print(f"\nStandard ensemble (APGD-CE, APGD-T 9 targets, FAB-T 9 targets, Square 5000 queries, each on the points "
          f"the earlier ones left), {x.shape[0]} points, {args.standard_repeats} alternated repeats each")
    print(tabulate(rows, headers=["eps", "implementation", "median s", "learnbench / this (goal <= 0.5)",
                                  "worst-case acc", "learnbench - this, pp (goal |.| <= 1)"], floatfmt=".3f"))


def _autoattack_100(torchattacks, model: nn.Module, eps: float, n_classes: int, seed: int):
    """torchattacks' standard AutoAttack with APGD, APGD-T and FAB at 100 iterations (fra31/auto-attack's
    standard), built from its own classes the way its AutoAttack builds them."""
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=seed),
        torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=n_classes, seed=seed),
        torchattacks.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                         n_classes=n_classes, seed=seed),
        torchattacks.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed)])


def _train(data, epochs: int, device: torch.device) -> nn.Module:
    """The attacked model: MLP D-256-256-C, learnbench's backprop (Adam, batch 128), fixed seed."""
    model = seeded_model(MLP_256, data, device)
    generator = torch.Generator(device=device).manual_seed(0)
    trainer = Backprop(batch_size=128)
    n = data.train_x.shape[0]
    trainer.setup(model, TaskInfo(tuple(data.input_shape), data.n_classes, n, device), generator)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator, device=device)
        for start in range(0, n - 127, 128):
            idx = order[start:start + 128]
            trainer.step(Batch(data.train_x[idx], data.train_y[idx]))
    return model.eval()


def _art(attack, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    np.random.seed(seed)  # ART draws its random start from numpy's global generator
    adv = attack.generate(x=x.cpu().numpy(), y=y.cpu().numpy())
    return torch.from_numpy(adv).to(x.device)


def _ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, seed: int,
          early_stop: bool) -> torch.Tensor:
    generator = torch.Generator(device=x.device).manual_seed(seed)
    with attack_mode(model):
        return pgd_linf(model, x, y, args.eps, generator=generator, steps=args.steps, early_stop=early_stop)


def _timed(fn, seed: int, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    start = time.perf_counter()
    adv = fn(seed)
    sync(device)
    return time.perf_counter() - start, adv


@torch.no_grad()
def _robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor) -> float:
    return ((model(x).argmax(1) == y) & (model(adv).argmax(1) == y)).float().mean().item()


def _print(args, device, model, x, y, times, accs) -> None:
    art_name, same_name = list(times)[:2]
    rows = [(name, statistics.median(t), min(t), max(t), statistics.mean(accs[name]))
            for name, t in times.items()]
    ratio = median_ratio(times[same_name], times[art_name])
    gap = abs(statistics.mean(accs[same_name]) - statistics.mean(accs[art_name]))
    clean = _robust_accuracy(model, x, y, x)
    print(f"PGD-Linf, {args.dataset} MLP 256-256 (clean accuracy {clean:.3f} on these points): {x.shape[0]} points, "
          f"eps {args.eps:g}, {args.steps} steps, {device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} counted repeats each (alternated)")
    print(tabulate(rows, headers=["implementation", "median s", "min s", "max s", "robust acc"], floatfmt=".3f"))
    print(f"ratio learnbench / ART (same work): {ratio:.3f} (median of {args.repeats} alternated pairs; goal <= 0.5)")
    print(f"robust accuracy gap: {100 * gap:.2f} pp (mean over repeats; goal <= 2 pp)")

