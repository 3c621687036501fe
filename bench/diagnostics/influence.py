"""Influence locality: which earlier layers does each layer of a trained MLP read from, with and without skips?

Run on a finished trial by `learnbench diagnose RUN_DIR [--trial ID]`, on the first `--examples` test points.

Definitions, for the built-in `mlp` and `resmlp` (blocks B_0 .. B_{L-1}, then the head, which is layer L):

* **Units.** Layer l's units are the outputs of its block, f_l = B_l(input) [N, W] (after the activation; for the
  head, the logits). Pixels are not units of any layer, so block 0, which reads only pixels, is not reported.
* **The stream.** In the `mlp`, layer l reads f_{l-1}. In the `resmlp`, it reads s_{l-1} = f_0 + f_1 + ... + f_{l-1}:
  every skip adds a block's output to the residual stream unchanged, so the stream is a sum of one *component* per
  earlier layer (the residual-stream decomposition of Elhage et al. 2021, "A Mathematical Framework for Transformer
  Circuits"; f_0 = B_0(x) opens the stream, since the first block changes the width and has no skip).
* **Upstream units.** The upstream units of layer l are the pairs (k, i): unit i of the component f_k that reaches
  layer l's input directly, without passing through another block. In the `mlp` that is only k = l - 1; in the
  `resmlp` every k < l.
* **Attribution.** Gradient times activation (Shrikumar et al. 2016; Ancona et al. 2018), per example n:
  a_n(k, i -> l, j) = f_k[n, i] * d f_l[n, j] / d s[n, i], with s the stream entering layer l. Because s[i] is the sum
  of the components' units, these terms split the stream unit's own gradient-times-input exactly by source layer.
  Equivalently: gate component k's unit i by c in layer l's input only; a is d f_l[j] / d c at c = 1 (the tests
  check this by finite differences on an independent NumPy forward pass).
* **Influence** of (k, i) on (l, j): the mean over examples of |a_n|.
* **Distance** of an upstream unit: l - k layers (1: the previous layer; l: the first block's component).

Summaries per target layer (named by its Linear, `blocks.<l>.0` or `head`, as the gradient-flow metrics):

| metric                              | what                                                                      |
| ----------------------------------- | ------------------------------------------------------------------------- |
| `influence/share/<layer>/<d>`       | of each unit's `top` most influential upstream units, the share at        |
|                                     | distance d (d = 1 .. l; the histogram the report draws)                    |
| `influence/mean-distance/<layer>`   | the mean of that distribution, in layers                                  |
| `influence/mass-distance/<layer>`   | the mean distance weighted by influence over all upstream units           |

In the `mlp` every distance is 1 by construction: it is the strict hierarchy the `resmlp` is compared with. A
`resmlp` whose layers still read mostly from the layer before keeps that hierarchy; large distances mean the skips
let layers read straight from early components. Only direct paths count: an early unit that acts through an
intermediate block is credited to that block (the path-length view of residual nets is Veit et al. 2016's).

What decides the ranking: all components reach layer l through the same sum, so on one example the derivative
d f_l[j] / d s[i] is shared by every source k, and the sources of one stream channel i are ranked by their values
|f_k[n, i]| (averaged with the derivative's weight over examples). The target's Jacobian picks which channels matter;
the components' magnitudes in those channels pick the layer. With sigmoid blocks every component lies in (0, 1), so
the influence *mass* spreads almost evenly over the earlier layers (mass-distance near (l + 1) / 2); the top-unit
histogram is the more telling summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from learnbench.errors import UsageError
from learnbench.models import MLP
from learnbench.trial import StoredTrial

KINDS = ("mlp", "resmlp")
DEFAULT_EXAMPLES = 1000
DEFAULT_TOP = 10
CHUNK = 256  # examples per Jacobian: [CHUNK, out, W] floats


@dataclass
class LayerInfluence:
    """Influence of the upstream units of one target layer."""

    layer: str
    """The target layer's Linear name (`blocks.3.0`, `head`)."""
    index: int
    """Its position l: blocks 0 .. L-1, head L."""
    sources: list[int]
    """Source layer k of each component, in the order of `scores`' first dimension."""
    scores: Tensor
    """[K, W, out]: mean |activation x gradient| of component k's unit i on target unit j."""


def components(model: MLP, x: Tensor) -> list[Tensor]:
    """Every block's output f_k [N, W] on inputs x (the model's forward, one block at a time)."""
    h, out = x.flatten(1), []
    for i, block in enumerate(model.blocks):
        f = block(h)
        out.append(f)
        h = h + f if model.residual and i > 0 else f
    return out


def attributions(model: MLP, x: Tensor, chunk: int = CHUNK) -> list[LayerInfluence]:
    """Per target layer 1 .. L (blocks after the first, then the head), the influence of its upstream units."""
    _check(model)
    names = _layer_names(model)
    targets = [*list(model.blocks)[1:], model.head]
    totals: list[Tensor | None] = [None] * len(targets)
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            parts = components(model, x[start:start + chunk])
            for t, target in enumerate(targets):
                l = t + 1
                sources = parts[:l] if model.residual else parts[l - 1:l]  # each [n, W]
                part = _scores(target, torch.stack(sources, 1))
                totals[t] = part if totals[t] is None else totals[t] + part
    n = x.shape[0]
    return [LayerInfluence(names[t + 1], t + 1, list(range(t + 1)) if model.residual else [t], total / n)
            for t, total in enumerate(totals)]


def _scores(target: nn.Module, sources: Tensor) -> Tensor:
    """Sum over examples of |f_k[n, i]| |d target_j / d s_i| for sources [n, K, W] (s = their sum): [K, W, out]."""
    stream = sources.sum(1)  # [n, W]

    def one(v: Tensor) -> Tensor:  # one example; a batch of one keeps BatchNorm1d and friends happy
        return target(v.unsqueeze(0)).squeeze(0)

    with torch.enable_grad():
        jac = vmap(jacrev(one))(stream)  # [n, out, W]
    return torch.einsum("nki,nji->kij", sources.abs(), jac.detach().abs())


def summarize(influence: LayerInfluence, top: int = DEFAULT_TOP) -> dict[str, float]:
    """The metrics of one target layer (see the module docstring)."""
    scores, l = influence.scores, influence.index
    k_count, width, out = scores.shape
    distance = torch.tensor([l - k for k in influence.sources], dtype=torch.float64)  # [K]
    flat = scores.reshape(k_count * width, out)  # [(k, i), j]
    top = min(top, flat.shape[0])
    best = flat.topk(top, dim=0).indices  # [top, out]
    picked = distance[best // width]  # [top, out] distances of each unit's top upstream units
    metrics = {f"influence/share/{influence.layer}/{d}": float((picked == d).double().mean())
               for d in range(1, l + 1)}
    metrics[f"influence/mean-distance/{influence.layer}"] = float(picked.mean())
    mass = scores.double().sum((1, 2))  # [K]
    if float(mass.sum()) > 0:
        metrics[f"influence/mass-distance/{influence.layer}"] = float((mass * distance).sum() / mass.sum())
    return metrics


def influence_metrics(model: MLP, x: Tensor, top: int = DEFAULT_TOP) -> dict[str, float]:
    """Every target layer's metrics for `model` on inputs x."""
    metrics: dict[str, float] = {}
    for layer in attributions(model, x):
        metrics.update(summarize(layer, top))
    return metrics


def diagnose_run(run_dir: str | Path, trial: str | None = None, examples: int = DEFAULT_EXAMPLES,
                 top: int = DEFAULT_TOP, data_dir: str | None = None) -> list[dict[str, Any]]:
    """Influence metrics for the run's finished mlp/resmlp trials (or the one `trial` names, by id or prefix),
    added to the store with `Store.add_metrics`; returns one row per trial diagnosed."""
    from learnbench import datasets
    from learnbench.artifacts import load_model
    from learnbench.store import Store
    from learnbench.workspace import RunDirLock

    if examples <= 0 or top <= 0:
        raise UsageError(f"--examples and --top must be positive; got {examples} and {top}")
    store = Store.open(run_dir)
    try:
        chosen = _select(store.trials(), trial)
        rows, data = [], {}
        with RunDirLock(Path(run_dir)):
            for t in chosen:
                model = load_model(run_dir, t.id)
                if t.dataset not in data:
                    data[t.dataset] = datasets.load(t.dataset, data_dir)
                metrics = influence_metrics(model, data[t.dataset].test_x[:examples], top)
                store.add_metrics(t.id, metrics)
                rows.append({"trial": t.id, "label": t.label, "model": t.model_label, "seed": t.seed,
                             "metrics": metrics})
    finally:
        store.close()
    return rows


def _select(trials: list[StoredTrial], trial: str | None) -> list[StoredTrial]:
    if trial is not None:
        matches = [t for t in trials if t.id.startswith(trial)]
        if len(matches) != 1:
            raise UsageError(f"--trial {trial!r} matches {len(matches)} trials of this run; give a longer id")
        t = matches[0]
        if t.is_search:
            raise UsageError(f"trial {t.id[:12]} is a tuning search configuration: it keeps no weights and never "
                             "reads test points")
        if t.status != "done" or t.model["kind"] not in KINDS:
            raise UsageError(f"trial {t.id[:12]} is {t.status} with a {t.model['kind']} model; "
                             f"influence locality needs a done trial of an mlp or resmlp")
        return matches
    chosen = [t for t in trials if t.status == "done" and t.model["kind"] in KINDS and not t.is_search]
    if not chosen:
        raise UsageError("no done trial with an mlp or resmlp model in this run; influence locality needs one")
    return chosen


def _check(model: nn.Module) -> None:
    if not isinstance(model, MLP):
        raise UsageError(f"influence locality is defined for the built-in mlp and resmlp; got {type(model).__name__}")
    if not model.blocks:
        raise UsageError("influence locality needs at least one hidden layer")


def _layer_names(model: MLP) -> list[str]:
    """Each block's Linear name, then `head`: the names the gradient-flow metrics use."""
    names = []
    for i, block in enumerate(model.blocks):
        linear = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)][0]
        names.append(f"blocks.{i}.{linear}")
    return [*names, "head"]
