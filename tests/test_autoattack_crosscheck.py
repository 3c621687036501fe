"""learnbench's standard preset against an independent implementation of the same standard: torchattacks'
AutoAttack (Linf, version "standard": APGD-CE, APGD-T, FAB-T, Square 5,000 queries), on the same saved model and
the same MNIST test points. The two must agree on robust accuracy within 1 point, learnbench never weaker by more.
Skipped with a reason when torchattacks (the `peers` extra) or the MNIST files are missing; `.ci/run` installs both.
"""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from learnbench import datasets
from learnbench.algorithms.backprop import Backprop
from learnbench.attacks import attack_mode
from learnbench.attacks.robustness import evaluate, resolve_settings
from learnbench.models import build
from learnbench.spec import Batch, TaskInfo

from conftest import SHARED_DATA

torchattacks = pytest.importorskip("torchattacks", reason="torchattacks is in the peers extra: "
                                                           "pip install 'learnbench[peers]'")

POINTS = 500
EPS = 0.05  # where a quickly trained MLP keeps about half its points: every attack of the ensemble has work


@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory):
    """A 784-64-10 MLP trained one epoch on MNIST with learnbench's backprop, saved and reloaded as safetensors."""
    if not (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST IDX files not found under {SHARED_DATA} (set LEARNBENCH_DATA)")
    splits = datasets.load("mnist", str(SHARED_DATA))
    torch.manual_seed(0)
    model = build({"kind": "mlp", "hidden": [64]}, tuple(splits.input_shape), splits.n_classes)
    generator = torch.Generator().manual_seed(0)
    trainer = Backprop(batch_size=128)
    n = splits.train_x.shape[0]
    trainer.setup(model, TaskInfo(tuple(splits.input_shape), splits.n_classes, n, torch.device("cpu")), generator)
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - 127, 128):
        idx = order[start:start + 128]
        trainer.step(Batch(splits.train_x[idx], splits.train_y[idx]))
    path = tmp_path_factory.mktemp("model") / "mlp.safetensors"
    save_file(model.state_dict(), str(path))
    reloaded = build({"kind": "mlp", "hidden": [64]}, tuple(splits.input_shape), splits.n_classes)
    reloaded.load_state_dict(load_file(str(path)))
    return reloaded.eval(), splits.test_x[:POINTS], splits.test_y[:POINTS]


@pytest.mark.slow
def test_standard_preset_agrees_with_torchattacks_autoattack(saved_mlp):
    model, x, y = saved_mlp
    settings = resolve_settings({"preset": "standard", "attacks": [], "eps_linf": [EPS],
                                 "examples": POINTS}, "mnist")
    started = time.perf_counter()
    ours = evaluate(model, x, y, settings, generator=torch.Generator().manual_seed(0))
    ours_seconds = time.perf_counter() - started
    ours_acc = ours[f"robust/worst-case/linf/{EPS:g}"]

    attack = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0)
    with attack_mode(model):
        started = time.perf_counter()
        adv = attack(x, y)
        theirs_seconds = time.perf_counter() - started
        theirs_acc = ((model(x).argmax(1) == y) & (model(adv).argmax(1) == y)).float().mean().item()
    clean = ours["robust/clean"]
    print(f"clean {clean:.3f}; worst case: learnbench {ours_acc:.3f} in {ours_seconds:.1f} s "
          f"(ensemble {ours['robust/seconds/standard']:.1f} s), torchattacks {theirs_acc:.3f} in {theirs_seconds:.1f} s")
    assert 0.2 < theirs_acc < clean - 0.2, "the test needs a model with work for every attack at this eps"
    assert abs(ours_acc - theirs_acc) <= 0.01, (ours_acc, theirs_acc)
    # the ensemble's running figures end at the worst case and never rise
    running = [ours[f"robust/ensemble/{a}/{EPS:g}"] for a in ("apgd-ce", "apgd-t", "fab-t", "square")]
    assert running == sorted(running, reverse=True) and running[-1] >= ours_acc
