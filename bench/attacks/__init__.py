"""Adversarial robustness: one attack per file; `robustness.py` holds what the runner calls.

Runner hooks (ARCHITECTURE.md, "Runner hooks / Robustness"): `resolve_settings(table, dataset)`,
`evaluate(model, x, y, settings, *, generator, training_model=None)` and
`post_run(store, run_dir, device, data_dir=None)`.
The attacks themselves (`fgsm`, `pgd_linf`, `pgd_l2`, `apgd_ce`, `apgd_dlr`, `apgd_t`, `fab_t`, `square_linf`,
`gaussian_noise`) take a model and a batch and return adversarial inputs; call them inside `attack_mode(model)`.
`ensemble.py` runs the standard preset (AutoAttack's ensemble) and computes the per-example worst case.
"""

from .apgd import apgd_ce, apgd_dlr, apgd_t
from .common import attack_mode
from .fab import fab_min_norm, fab_t
from .fgsm import fgsm
from .noise import gaussian_noise
from .pgd import pgd_linf
from .pgd_l2 import pgd_l2
from .robustness import ATTACKS, evaluate, post_run, resolve_settings
from .square import square_linf

__all__ = ["ATTACKS", "apgd_ce", "apgd_dlr", "apgd_t", "attack_mode", "evaluate", "fab_min_norm", "fab_t", "fgsm",
           "gaussian_noise", "pgd_l2", "pgd_linf", "post_run", "resolve_settings", "square_linf"]
