"""The standard preset: AutoAttack's ensemble (Croce & Hein 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML; reference code fra31/auto-attack, `version='standard'`)
and the per-example worst case over every attack a trial ran.

`robustness.preset = "standard"` runs, at every eps of the Linf grid,

    APGD-CE (100 steps)  ->  APGD-T (DLR loss, 9 targets x 100 steps)  ->  FAB-T (9 targets x 100 steps)
    ->  Square (5,000 queries)

each from the clean input and only on the points every earlier attack left correctly classified, as AutoAttack's
standard version does. A point is robust when no attack of the ensemble broke it. Metrics, eps written with `%g`:

  robust/ensemble/<attack>/<eps>      accuracy after the ensemble up to and including <attack> (AutoAttack's
                                      running figure: "robust accuracy after APGD-T")
  robust/first-break/<attack>/<eps>   fraction of the attacked points that <attack> broke first
  robust/worst-case/linf/<eps>        the per-example worst case over the ensemble and every other Linf attack the
                                      trial ran on the model itself (true gradient or black box: fgsm, pgd-linf,
                                      apgd-ce, apgd-t, fab-t, square). Not the pseudo-gradient attack (it follows
                                      the trainer's backward, reported on its own) nor transfer (after the run).
  robust/auc/worst-case/linf          its area under the curve, as for every attack

The worst case is also recorded with the quick preset (over the Linf attacks that ran), so every run has it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

ENSEMBLE = ("apgd-ce", "apgd-t", "fab-t", "square")
"""AutoAttack's standard order: cheap and strong first, so the expensive attacks see few points."""
TRUE_OR_BLACK_BOX_LINF = ("fgsm", "pgd-linf", "apgd-ce", "apgd-t", "fab-t", "square")
"""Standalone Linf attacks on the model itself that enter the worst case."""

Masks = dict[float, Tensor]
"""eps -> [N] bool: the point is still classified correctly."""
AttackMasks = Callable[[str, Masks], Masks]
"""(attack id, points to attack per eps) -> points still correct per eps (`robustness.robust_masks` bound)."""


def run_ensemble(attack_masks: AttackMasks, clean: Tensor, eps_grid: list[float]) -> dict[str, Masks]:
    """Run the ensemble in order; returns attack -> eps -> [N] bool still correct after the ensemble up to and
    including that attack (monotone: each attack only sees the points the earlier ones left)."""
    standing = {eps: clean.clone() for eps in eps_grid}
    after: dict[str, Masks] = {}
    for name in ENSEMBLE:
        survived = attack_masks(name, standing)
        standing = {eps: standing[eps] & survived[eps] for eps in eps_grid}
        after[name] = standing
    return after


def ensemble_metrics(after: dict[str, Masks], clean: Tensor) -> dict[str, float]:
    """`robust/ensemble/...` and `robust/first-break/...` from `run_ensemble`'s masks."""
    out: dict[str, float] = {}
    before = {eps: clean for eps in next(iter(after.values()))}
    for name, masks in after.items():
        for eps, mask in masks.items():
            key = f"{eps:g}"
            out[f"robust/ensemble/{name}/{key}"] = mask.float().mean().item()
            out[f"robust/first-break/{name}/{key}"] = (before[eps] & ~mask).float().mean().item()
        before = masks
    return out


def worst_case(robust: dict[str, Masks], ensemble: dict[str, Masks] | None) -> Masks | None:
    """eps -> [N] bool robust to every true-gradient or black-box Linf attack run (standalone and the ensemble's
    final survivors), at the eps they share; None when none ran."""
    curves = [robust[a] for a in TRUE_OR_BLACK_BOX_LINF if a in robust]
    if ensemble:
        curves.append(ensemble[ENSEMBLE[-1]])
    if not curves:
        return None
    shared = set.intersection(*(set(c) for c in curves))
    return {eps: torch.stack([c[eps] for c in curves]).all(0) for eps in sorted(shared)}


def square_beats_white_box(ensemble: dict[str, Masks], margin: float) -> float:
    """1.0 if the ensemble's Square broke more than `margin` of the points its three white-box attacks left
    (AutoAttack's `check_square_sr`, per point)."""
    white, black = ensemble["fab-t"], ensemble["square"]
    return float(any((white[eps] & ~black[eps]).float().mean().item() > margin for eps in white))
