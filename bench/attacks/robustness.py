"""Per-trial robustness evaluation: what the runner calls (`resolve_settings`, `evaluate`, `post_run`).

Every finished model is attacked on the first `examples` test points (the same points for every algorithm) through
its true input gradient, in eval mode with its weights frozen. Only points the model classifies correctly are
attacked; a point is robust at eps when it is classified correctly both clean and after the attack. Metrics:

  robust/clean                      accuracy on the attacked points
  robust/<attack>/<eps>             robust accuracy (attack ids below; eps written with `%g`)
  robust/auc/<attack>               area under accuracy-vs-eps from (0, clean) to the largest eps, divided by that
                                    eps: 1 = perfectly accurate and robust, clean accuracy = no loss at any eps
  robust/pgd-linf-pseudo/<eps>      rules with feedback weights only: PGD-Linf crafted through the rule's own
                                    backward (the FA family's feedback weights, PEPITA's error projection F: the
                                    trainer's `pseudo_gradient_model()`), scored on the plain model
  robust/seconds, robust/seconds/<attack>   wall-clock seconds (CUDA-synchronised), `masking` for the checks
  flag/masking/<check>              0/1 gradient-masking checks (masking.py)

Attacks (one file each): fgsm, pgd-linf, pgd-l2, apgd-ce, apgd-t (apgd.py), fab-t (fab.py), square, noise,
transfer (after the run: transfer.py). Linf attacks use the `eps_linf` grid, pgd-l2 and noise the `eps_l2` grid.

Presets. `preset = "quick"` (the default) runs the standalone attacks fgsm, pgd-linf, pgd-l2, apgd-ce, square
(1,000 queries), noise and transfer, each on every clean point. `preset = "standard"` runs AutoAttack's ensemble
(APGD-CE, APGD-T, FAB-T, Square with 5,000 queries, each on the points the earlier ones left; ensemble.py) plus the
standalone attacks the suite lists (default: transfer). Both record `robust/worst-case/linf/<eps>`, the per-example
worst case over the Linf attacks run on the model itself; `attacks` and `square_queries` override the preset's.

Default grids. Inputs are in [0, 1] for every dataset, so a Linf eps is a fraction of the pixel range and the
MNIST grid 0.05/0.1/0.2/0.3 applies unchanged to digits (0..16 scaled by 1/16) and mnist1d. An L2 eps measures a
whole image, so it is scaled by sqrt(D / 784) to keep MNIST's per-pixel RMS change: digits (D = 64) and mnist1d
(D = 40) get 0.5/1/2/3 times 0.286 and 0.226. Your own data (a `.npz` file, a plugin dataset) have no known
scale: with robustness on (`examples > 0`) the suite must give `eps_linf` for them (a usage error otherwise); their
default L2 grid is the MNIST one scaled by sqrt(D / 784) with their own D.

Budget. Madry's PGD (40 steps, 1 restart) and APGD-CE at its published 100 iterations are kept; Square runs 1000
queries instead of AutoAttack's 5000. On one MNIST MLP 784-256-256-10 (1000 points, one CPU thread of the 2-core
development machine) the whole default evaluation took 17 s at load 3 and 34 s at load 9, Square 10-21 s of it;
5000 queries would add about a minute. The price: at eps 0.05 Square leaves 0.60 accuracy with 1000 queries and
0.55 with 5000 (PGD 0.49); at eps >= 0.1 the two budgets differ by under 3 points. Raise `square_queries` for a
stronger black-box check. The eps grid is attacked as one batch (one radius per row), so small models pay the
per-step overheads once per attack rather than once per eps.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from .. import checks
from ..errors import UsageError
from . import ensemble, masking
from .apgd import apgd_ce, apgd_t
from .fab import fab_t
from .common import attack_mode, chunked, predict
from .fgsm import fgsm
from .noise import gaussian_noise
from .pgd import pgd_linf
from .pgd_l2 import pgd_l2
from .square import square_linf

if TYPE_CHECKING:
    from ..store import Store

ATTACKS = ("fgsm", "pgd-linf", "pgd-l2", "apgd-ce", "apgd-t", "fab-t", "square", "noise", "transfer")
NORM = {"fgsm": "linf", "pgd-linf": "linf", "pgd-l2": "l2", "apgd-ce": "linf", "apgd-t": "linf", "fab-t": "linf",
        "square": "linf", "noise": "l2", "transfer": "linf", "pgd-linf-pseudo": "linf"}
PRESETS: dict[str, dict[str, Any]] = {
    # quick: one of each kind, cheap enough for every trial of every suite (the module docstring's budget)
    "quick": {"attacks": ["fgsm", "pgd-linf", "pgd-l2", "apgd-ce", "square", "noise", "transfer"],
              "square_queries": 1000},
    # standard: AutoAttack's ensemble (ensemble.py) with Square at its 5,000 queries; standalone attacks on top
    # only where the suite lists them (the transfer attack costs one crafting per group)
    "standard": {"attacks": ["transfer"], "square_queries": 5000},
}
MNIST_LINF = [0.05, 0.1, 0.2, 0.3]
MNIST_L2 = [0.5, 1.0, 2.0, 3.0]
INPUT_DIMS = {"mnist": 784, "fashion-mnist": 784, "digits": 64, "mnist1d": 40}

DEFAULTS: dict[str, Any] = {
    "examples": 1000,              # first test points attacked; 0 turns robustness off
    "preset": "quick",             # quick, or standard: AutoAttack's ensemble and the worst case (ensemble.py)
    "attacks": None,               # standalone attacks; None: the preset's list
    "eps_linf": None,              # None: the dataset's grid (module docstring); or a table by dataset
    "eps_l2": None,
    "batch_size": 4096,            # rows (points x eps) attacked at once (bounds memory)
    "pgd_steps": 40,               # Madry et al. 2018
    "pgd_step_factor": 2.5,        # step = factor * eps / steps
    "pgd_restarts": 1,
    "apgd_steps": 100,             # Croce & Hein 2020
    "apgd_restarts": 1,
    "apgd_targets": 9,             # APGD-T: target classes, 100 steps each (AutoAttack's standard)
    "fab_steps": 100,              # FAB-T (Croce & Hein 2020): steps per target ...
    "fab_targets": 9,              # ... and target classes (AutoAttack's standard)
    "square_queries": None,        # None: the preset's (quick 1000, standard AutoAttack's 5000; module docstring)
    "square_p_init": 0.8,          # Andriushchenko et al. 2020, MNIST
    "square_restarts": 1,
    "pseudo_gradient": True,       # also attack feedback-alignment models through their own backward
    "masking_margin": 0.02,        # fraction of points a masking check tolerates
    "masking_steps_factor": 4,     # the more-iterations check: steps x this ...
    "masking_restarts": 2,         # ... and this many restarts
    "standard_eps": None,          # reports: the eps of the summary tables (a number, or a table by attack id)
    "transfer_source": None,       # label or algorithm id of the transfer attack's source; None: the suite's reference
}
POSITIVE_INT = ("batch_size", "pgd_steps", "pgd_restarts", "apgd_steps", "apgd_restarts", "apgd_targets",
                "fab_steps", "fab_targets", "square_queries", "square_restarts", "masking_steps_factor",
                "masking_restarts")


def eps_key(eps: float) -> str:
    return f"{eps:g}"


def default_grids(dataset: str, input_dim: int | None = None) -> tuple[list[float], list[float]]:
    scale = math.sqrt(INPUT_DIMS.get(dataset, input_dim or 784) / 784)
    return list(MNIST_LINF), [float(f"{e * scale:.3g}") for e in MNIST_L2]


def resolve_settings(table: dict, dataset: str, input_shape: tuple[int, ...] | None = None) -> dict:
    """Fill defaults into a suite's `[robustness]` table for one dataset (of inputs `input_shape`, for the L2 grid
    of a dataset not in INPUT_DIMS); UsageError naming a bad key or value, or a missing grid for your own data."""
    out = {**DEFAULTS, **checks.known_keys(table, DEFAULTS, "[robustness]")}
    if out["preset"] not in PRESETS:
        raise UsageError(f"robustness.preset must be one of {', '.join(PRESETS)}; got {out['preset']!r}")
    out.update({k: v for k, v in PRESETS[out["preset"]].items() if out[k] is None})
    linf, l2 = default_grids(dataset, math.prod(input_shape) if input_shape else None)
    for key in ("eps_linf", "eps_l2"):  # a table by dataset: {mnist = [...], fashion-mnist = [...]}
        if isinstance(out[key], dict):
            out[key] = out[key].get(dataset)
    if out["eps_linf"] is None and dataset not in INPUT_DIMS and out["examples"] != 0:
        raise UsageError(f"dataset {dataset}: learnbench does not know the scale of these inputs, so robustness "
                         "needs its Linf grid: set robustness.eps_linf (e.g. eps_linf = [0.05, 0.1]), or turn "
                         "robustness off with robustness.examples = 0")
    out["eps_linf"] = _eps_list(out["eps_linf"] if out["eps_linf"] is not None else linf, "eps_linf", 1.0)
    out["eps_l2"] = _eps_list(out["eps_l2"] if out["eps_l2"] is not None else l2, "eps_l2", math.inf)
    out["attacks"] = _attack_list(out["attacks"])
    checks.integer(out["examples"], "robustness.examples")
    for key in POSITIVE_INT:
        checks.integer(out[key], f"robustness.{key}", minimum=1)
    for key, low, high in (("pgd_step_factor", 0.0, math.inf), ("square_p_init", 0.0, 1.0),
                           ("masking_margin", 0.0, 1.0)):
        out[key] = checks.number(out[key], f"robustness.{key}", low, high, low_inclusive=key == "masking_margin")
    if not isinstance(out["pseudo_gradient"], bool):
        raise UsageError(f"robustness.pseudo_gradient must be true or false; got {out['pseudo_gradient']!r}")
    out["standard_eps"] = _standard_eps(out["standard_eps"])
    if out["transfer_source"] is not None and (not isinstance(out["transfer_source"], str)
                                               or not out["transfer_source"]):
        raise UsageError(f"robustness.transfer_source must be an algorithm label or id; got {out['transfer_source']!r}")
    return out


def evaluate(model: nn.Module, x: Tensor, y: Tensor, settings: dict, *, generator: torch.Generator,
             training_model: nn.Module | None = None) -> dict[str, float]:
    """Attack `model` on x [N, ...], y [N] (the first `examples` test points, on the run's device) with every
    attack in `settings` but transfer (see `post_run`); returns the metrics listed in the module docstring."""
    n = settings["examples"]
    if n == 0:
        return {}
    x, y = x[:n], y[:n]
    pseudo = settings["pseudo_gradient"] and training_model is not None and has_feedback_layers(training_model)
    extra = (training_model,) if pseudo else ()
    started = _now(x.device)
    with attack_mode(model, *extra):
        clean = predict(model, x, settings["batch_size"]) == y  # [N]
        metrics, robust = {"robust/clean": clean.float().mean().item()}, {}
        for name in [a for a in settings["attacks"] if a != "transfer"]:
            robust[name] = _timed(metrics, name, x.device, lambda: _run_attack(
                name, model, x, y, clean, settings, generator))
        if pseudo:
            robust["pgd-linf-pseudo"] = _timed(metrics, "pgd-linf-pseudo", x.device, lambda: _run_attack(
                "pgd-linf", model, x, y, clean, settings, generator, grad_model=training_model))
        standard = None
        if settings["preset"] == "standard":
            def attack_masks(name: str, targets: dict[float, Tensor]) -> dict[float, Tensor]:
                attack = attack_fn(name, model, settings, generator)
                return robust_masks(model, attack, x, y, targets, settings["eps_linf"], "linf", settings["batch_size"])

            standard = _timed(metrics, "standard", x.device, lambda: ensemble.run_ensemble(
                attack_masks, clean, settings["eps_linf"]))
            metrics.update(ensemble.ensemble_metrics(standard, clean))
        worst = ensemble.worst_case(robust, standard)
        for name, by_eps in {**robust, **({"worst-case/linf": worst} if worst else {})}.items():
            metrics.update(accuracy_metrics(name, metrics["robust/clean"],
                                            {eps: m.float().mean().item() for eps, m in by_eps.items()}))
        metrics.update(_timed(metrics, "masking", x.device, lambda: _masking_flags(
            model, x, y, clean, robust, settings, generator, standard, worst)))
    metrics["robust/seconds"] = _now(x.device) - started
    return metrics


def post_run(store: Store, run_dir: str | Path, device: str | torch.device, data_dir: str | None = None) -> None:
    """After all trials: the transfer attack from each group's source model to its siblings (see transfer.py)."""
    from .transfer import transfer_post_run

    transfer_post_run(store, run_dir, torch.device(device), data_dir)


def has_feedback_layers(model: nn.Module) -> bool:
    """True when a module's class declares `uses_feedback_weights = True` (the feedback-alignment converter's)."""
    return any(getattr(type(m), "uses_feedback_weights", False) for m in model.modules())


def accuracy_metrics(name: str, clean: float, acc: dict[float, float]) -> dict[str, float]:
    """`robust/<name>/<eps>` for each eps and `robust/auc/<name>` (trapezoid from (0, clean), over the largest eps)."""
    out = {f"robust/{name}/{eps_key(eps)}": a for eps, a in acc.items()}
    xs, ys = [0.0, *sorted(acc)], [clean, *(acc[e] for e in sorted(acc))]
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
    out[f"robust/auc/{name}"] = area / xs[-1]
    return out


def grid(settings: dict, name: str) -> list[float]:
    return settings["eps_linf"] if NORM[name] == "linf" else settings["eps_l2"]


def attack_fn(name: str, model: nn.Module, settings: dict, generator: torch.Generator,
              grad_model: nn.Module | None = None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The attack `name` bound to its model and settings: (x, y, eps [B]) -> x_adv."""
    s, g = settings, generator
    table: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
        "fgsm": lambda x, y, eps: fgsm(model, x, y, eps),
        "pgd-linf": lambda x, y, eps: pgd_linf(model, x, y, eps, generator=g, steps=s["pgd_steps"],
                                               step_factor=s["pgd_step_factor"], restarts=s["pgd_restarts"],
                                               grad_model=grad_model),
        "pgd-l2": lambda x, y, eps: pgd_l2(model, x, y, eps, generator=g, steps=s["pgd_steps"],
                                           step_factor=s["pgd_step_factor"], restarts=s["pgd_restarts"]),
        "apgd-ce": lambda x, y, eps: apgd_ce(model, x, y, eps, generator=g, steps=s["apgd_steps"],
                                             restarts=s["apgd_restarts"]),
        "apgd-t": lambda x, y, eps: apgd_t(model, x, y, eps, generator=g, steps=s["apgd_steps"],
                                           n_targets=s["apgd_targets"]),
        "fab-t": lambda x, y, eps: fab_t(model, x, y, eps, generator=g, steps=s["fab_steps"],
                                         n_targets=s["fab_targets"]),
        "square": lambda x, y, eps: square_linf(model, x, y, eps, generator=g, queries=s["square_queries"],
                                                p_init=s["square_p_init"], restarts=s["square_restarts"]),
        "noise": lambda x, y, eps: gaussian_noise(x, eps, generator=g),
    }
    return table[name]


def robust_masks(model: nn.Module, attack: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                 targets: Tensor | dict[float, Tensor], eps_grid: list[float], norm: str,
                 chunk: int) -> dict[float, Tensor]:
    """eps -> [N] bool: the point is among `targets` (the points to attack: one [N] bool mask for every eps, or one
    per eps) and still classified correctly after the attack at that eps. The whole grid is one batch (rows:
    eps-major copies of each eps's targets, each with its own radius). Checks that every adversarial point is in
    [0, 1] and inside its ball."""
    per_eps = targets if isinstance(targets, dict) else {eps: targets for eps in eps_grid}
    idx = {eps: per_eps[eps].nonzero().squeeze(1) for eps in eps_grid}  # eps -> [n_eps]
    out = {eps: torch.zeros_like(per_eps[eps]) for eps in eps_grid}
    rows = torch.cat([idx[eps] for eps in eps_grid])  # [R] point index of each row
    if rows.numel() == 0:
        return out
    xs, ys = x[rows], y[rows]  # [R, ...], [R]
    radii = torch.cat([torch.full((idx[eps].numel(),), eps, dtype=x.dtype, device=x.device) for eps in eps_grid])
    adv = chunked(attack, xs, ys, radii, chunk)
    check_constraint(adv, xs, radii, norm)
    still = (predict(model, adv, chunk) == ys).split([idx[eps].numel() for eps in eps_grid])
    for eps, row in zip(eps_grid, still):
        out[eps][idx[eps]] = row
    return out


def check_constraint(adv: Tensor, x: Tensor, eps: float | Tensor, norm: str, tol: float = 1e-5) -> None:
    """Raise if an attack left [0, 1] or the eps ball (eps: one radius or one per row): a bug, never a result."""
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    if adv.min() < 0 or adv.max() > 1 or bool((size > eps * (1 + tol) + tol).any()):
        raise RuntimeError(f"an attack left the {norm} ball or the [0, 1] box")


def _run_attack(name: str, model: nn.Module, x: Tensor, y: Tensor, clean: Tensor, settings: dict,
                generator: torch.Generator, grad_model: nn.Module | None = None) -> dict[float, Tensor]:
    attack = attack_fn(name, model, settings, generator, grad_model)
    return robust_masks(model, attack, x, y, clean, grid(settings, name), NORM[name], settings["batch_size"])


def _masking_flags(model: nn.Module, x: Tensor, y: Tensor, clean: Tensor, robust: masking.Robust,
                   settings: dict, generator: torch.Generator, standard: masking.Robust | None = None,
                   worst: dict[float, Tensor] | None = None) -> dict[str, float]:
    """The masking checks (masking.py) on the standalone attacks and, when it ran, on the ensemble: its Square
    against its white-box attacks, its worst-case curve as an iterative attack's, and the more-iterations check
    with APGD-CE (when PGD did not run)."""
    margin, chunk = settings["masking_margin"], settings["batch_size"]
    curves = {**robust, **({"worst-case": worst} if worst and standard else {})}
    checks = {k: v for k, v in {
        "black-box-beats-white-box": masking.black_box_beats_white_box(robust, margin),
        "accuracy-not-falling": masking.accuracy_not_falling(curves, margin),
    }.items() if v is not None}
    if standard:
        fired = ensemble.square_beats_white_box(standard, margin)
        checks["black-box-beats-white-box"] = max(fired, checks.get("black-box-beats-white-box", 0.0))
    checks["zero-gradients"] = float(masking.zero_gradient_fraction(model, x[clean], y[clean], chunk) > margin)
    if "pgd-linf" in robust or (standard and worst):
        name, base = ("pgd-linf", robust["pgd-linf"]) if "pgd-linf" in robust else ("apgd-ce", worst)
        factor, restarts = settings["masking_steps_factor"], settings["masking_restarts"]
        strong_settings = {**settings, "pgd_steps": settings["pgd_steps"] * factor, "pgd_restarts": restarts,
                           "apgd_steps": settings["apgd_steps"] * factor, "apgd_restarts": restarts}
        attack = attack_fn(name, model, strong_settings, generator)

        def strong(points: Tensor, eps: float) -> Tensor:
            targets = torch.zeros_like(clean)
            targets[points] = True
            return robust_masks(model, attack, x, y, targets, [eps], "linf", chunk)[eps][points]

        checks["more-iterations-help"] = masking.more_iterations_help(base, clean, strong, margin)
    return {f"flag/masking/{k}": v for k, v in checks.items()}


def _timed(metrics: dict[str, float], name: str, device: torch.device, fn: Callable[[], Any]) -> Any:
    start = _now(device)
    result = fn()
    metrics[f"robust/seconds/{name}"] = _now(device) - start
    return result


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _eps_list(value: Any, key: str, high: float) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value:
        raise UsageError(f"robustness.{key} must be a non-empty list of numbers; got {value!r}")
    out = [checks.number(v, f"robustness.{key}", 0.0, high) for v in value]
    if len(set(out)) != len(out):
        raise UsageError(f"robustness.{key} has a repeated value: {value!r}")
    return sorted(out)


def _standard_eps(value: Any) -> float | dict[str, float] | None:
    """None, one eps for every attack, or {attack id: eps} (ids as in metric names, pgd-linf-pseudo included)."""
    if value is None:
        return None
    if isinstance(value, dict):
        bad = [k for k in value if k not in NORM]
        if bad:
            raise UsageError(f"unknown attack(s) in robustness.standard_eps: {', '.join(bad)}")
        return {k: checks.number(v, "robustness.standard_eps") for k, v in value.items()}
    return checks.number(value, "robustness.standard_eps")


def _attack_list(value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"robustness.attacks must be a list of attack ids; got {value!r}")
    bad = [v for v in value if v not in ATTACKS]
    if bad:
        raise UsageError(f"unknown attack(s) in robustness.attacks: {', '.join(bad)}; known: {', '.join(ATTACKS)}")
    return [a for a in ATTACKS if a in value]  # canonical order, duplicates dropped
