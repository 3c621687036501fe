"""The common models every algorithm trains: `build(spec, input_shape, n_classes) -> nn.Module`.

A spec is a small dict (from a suite's `[[models]]` table):

* `mlp`     hidden sizes (`hidden = [256, 256]`, or `width` and `depth`), `activation`, `norm`. A deep net for the
            diagnostics: `{kind = "mlp", width = 128, depth = 12, activation = "sigmoid"}` (tested to depth 20).
* `resmlp`  the same MLP with identity skips around every hidden-to-hidden layer (so all hidden sizes are equal).
* `cnn`     the 11,274-parameter ConvNet of EvoJAX/evosax (conv8 5x5, pool, conv16 5x5, pool, dense 10);
            `depth` adds conv blocks (channels double), `norm` adds BatchNorm/LayerNorm after each conv.
* `lenet`   LeNet-5 (LeCun et al. 1998): conv6 5x5, pool, conv16 5x5, pool, 120, 84, classes; tanh, average pool.
* `factory` any user `nn.Module`: `factory = "package.module:function"` or `"path/to/file.py:function"`, called
            as `function(input_shape=..., n_classes=..., **other_keys)`. In a suite file, a module or `.py` path
            found beside the suite (`my_model:build` with `my_model.py` in the suite's folder) resolves from there,
            as `--plugin` files do (`config.load_suite` rewrites it to the file's absolute path). The factory's
            source file is hashed into the trial id (`factory_digests`), and `check_factory` builds it once before
            anything runs, so a broken import is a usage error rather than a run of failed trials.

Models are plain `nn.Module`s made of `Linear`/`Conv2d` layers so that feedback-alignment conversion, population
evaluation and attacks all work on them without special cases.
"""

from __future__ import annotations

import hashlib
import math
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import checks
from .errors import UsageError, did_you_mean

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
}
NORMS = ("none", "batch", "layer")

# Default values of every key each kind accepts; an unknown key is an error.
DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [256, 256], "width": None, "depth": None, "activation": "relu", "norm": "none"},
    "resmlp": {"hidden": [256, 256], "width": None, "depth": None, "activation": "relu", "norm": "none"},
    "cnn": {"channels": [8, 16], "depth": None, "kernel": 5, "activation": "relu", "norm": "none"},
    "lenet": {"activation": "tanh", "pool": "avg"},
}
KINDS = (*DEFAULTS, "factory")


def normalize_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and validate a spec; raises UsageError naming the bad key. The result is what gets hashed."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise UsageError(f"a model spec needs a 'kind' (one of {', '.join(KINDS)}); got {spec!r}")
    kind = spec["kind"]
    if kind == "factory":
        if not isinstance(spec.get("factory"), str) or ":" not in spec["factory"]:
            raise UsageError("model kind 'factory' needs factory = \"package.module:function\"")
        return dict(spec)
    if kind not in DEFAULTS:
        raise UsageError(f"unknown model kind {kind!r}{did_you_mean(str(kind), KINDS)}; known: {', '.join(KINDS)}")
    checks.known_keys(spec, ("kind", *DEFAULTS[kind]), f"model {kind!r}")
    out = {"kind": kind, **DEFAULTS[kind], **spec}
    if kind in ("mlp", "resmlp"):
        if out["depth"] is not None or out["width"] is not None:
            depth = out["depth"] if out["depth"] is not None else len(out["hidden"])
            width = out["width"] if out["width"] is not None else out["hidden"][0]
            depth, width = checks.integer(depth, "model.depth", 1), checks.integer(width, "model.width", 1)
            out["hidden"] = [width] * depth
        out.pop("width"), out.pop("depth")
        out["hidden"] = [checks.integer(h, "model.hidden", 1) for h in _as_list(out["hidden"], "model.hidden")]
        if kind == "resmlp" and len(set(out["hidden"])) > 1:
            raise UsageError(f"resmlp needs equal hidden sizes for identity skips; got {out['hidden']}")
    if kind == "cnn":
        if out["depth"] is not None:
            out["channels"] = [8 * 2**i for i in range(checks.integer(out["depth"], "model.depth", 1))]
        out.pop("depth")
        out["channels"] = [checks.integer(c, "model.channels", 1) for c in _as_list(out["channels"], "model.channels")]
        out["kernel"] = checks.integer(out["kernel"], "model.kernel", 1)
    if out.get("activation", "relu") not in ACTIVATIONS:
        raise UsageError(f"unknown activation {out['activation']!r}; known: {', '.join(ACTIVATIONS)}")
    if out.get("norm", "none") not in NORMS:
        raise UsageError(f"unknown norm {out['norm']!r}; known: {', '.join(NORMS)}")
    if kind == "lenet" and out["pool"] not in ("avg", "max"):
        raise UsageError(f"lenet pool must be 'avg' or 'max'; got {out['pool']!r}")
    return out


def label(spec: dict[str, Any]) -> str:
    """A short human label: mlp-256x2, resmlp-256x12, mlp-256-128, cnn, cnn-8-16-32, lenet, factory name."""
    kind = spec["kind"]
    if kind in ("mlp", "resmlp"):
        hidden = spec["hidden"]
        sizes = f"{hidden[0]}x{len(hidden)}" if hidden and len(set(hidden)) == 1 else "-".join(map(str, hidden))
        text = f"{kind}-{sizes}" if hidden else kind
    elif kind == "cnn":
        text = "cnn" if spec["channels"] == [8, 16] else "cnn-" + "-".join(map(str, spec["channels"]))
    elif kind == "factory":
        text = spec["factory"].rsplit(":", 1)[-1]
    else:
        text = kind
    extras = [spec[k] for k in ("activation", "norm") if k in spec and spec[k] != DEFAULTS[kind][k]]
    return "-".join([text, *extras])


def build(spec: dict[str, Any] | Callable[..., nn.Module], input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """Build a fresh model; initialisation draws from torch's global RNG (the runner seeds it per trial)."""
    if callable(spec):
        return spec(input_shape=tuple(input_shape), n_classes=n_classes)
    spec = normalize_spec(spec)
    kind = spec["kind"]
    if kind == "factory":
        kwargs = {k: v for k, v in spec.items() if k not in ("kind", "factory")}
        return _factory(spec["factory"])(input_shape=tuple(input_shape), n_classes=n_classes, **kwargs)
    if kind in ("mlp", "resmlp"):
        return MLP(math.prod(input_shape), spec["hidden"], n_classes, spec["activation"], spec["norm"],
                   residual=kind == "resmlp")
    _require_image(kind, input_shape)
    if kind == "cnn":
        return ConvNet(input_shape, spec["channels"], n_classes, spec["kernel"], spec["activation"], spec["norm"])
    return LeNet5(input_shape, n_classes, spec["activation"], spec["pool"])


def check_factory(spec: dict[str, Any], input_shape: tuple[int, ...], n_classes: int, where: str) -> None:
    """Build a `factory` model once for this dataset's shape (before anything runs): an import that fails, a
    missing or non-callable function, an exception or a result that is not an `nn.Module` is a UsageError."""
    try:
        model = build(spec, input_shape, n_classes)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's code: one line, no traceback
        raise UsageError(f"{where}: model factory {spec['factory']!r} failed for inputs {tuple(input_shape)} and "
                         f"{n_classes} classes: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{where}: model factory {spec['factory']!r} returned {type(model).__name__}, not a "
                         "torch.nn.Module")
    try:  # one forward pass on a [2, *input_shape] batch of zeros, in eval mode (BatchNorm accepts it there)
        with torch.no_grad():
            shape = tuple(model.eval()(torch.zeros(2, *input_shape)).shape)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{where}: the model of factory {spec['factory']!r} failed for inputs {tuple(input_shape)}"
                         f": {type(exc).__name__}: {exc}") from None
    if shape != (2, n_classes):
        raise UsageError(f"{where}: the model of factory {spec['factory']!r} gives outputs {list(shape)} for a "
                         f"batch of 2 inputs {tuple(input_shape)}; expected [2, {n_classes}] logits")


def factory_digests(spec: dict[str, Any]) -> dict[str, str]:
    """`{"factory:<file name>": SHA-256 prefix}` of a `factory` spec's source file (part of the trial id, as the
    trainer's modules are, `learnbench.identity`); {} for the built-in kinds or a factory without a source file."""
    if spec.get("kind") != "factory":
        return {}
    from .registry import target_source

    path = target_source(spec["factory"])
    if path is None:
        return {}
    return {f"factory:{Path(path).name}": hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}


def _factory(target: str) -> Callable[..., nn.Module]:
    """The function a `factory` string names (`registry.import_target`: `module:function`, or `file.py:function`
    loaded from the file under a private module name, one per file content)."""
    from .registry import import_target

    try:
        factory = import_target(target, "_learnbench_model_")
    except Exception as exc:  # noqa: BLE001 - any error the user's module raises on import
        raise UsageError(f"cannot import model factory {target!r}: {type(exc).__name__}: {exc}") from None
    if not callable(factory):
        raise UsageError(f"model factory {target!r} is not callable")
    return factory


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class MLP(nn.Module):
    """Flatten -> [Linear -> norm -> act] per hidden size -> Linear head; `residual` adds identity skips
    around every hidden-to-hidden block (the first block changes the width, so it has none)."""

    def __init__(self, in_features: int, hidden: list[int], n_classes: int, activation: str = "relu",
                 norm: str = "none", residual: bool = False):
        super().__init__()
        self.residual = residual
        sizes = [in_features, *hidden]
        self.blocks = nn.ModuleList(
            nn.Sequential(*_without_identity(nn.Linear(a, b), _norm_1d(norm, b), ACTIVATIONS[activation]()))
            for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.head = nn.Linear(sizes[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)  # [B, D]
        for i, block in enumerate(self.blocks):
            h = h + block(h) if self.residual and i > 0 else block(h)
        return self.head(h)  # [B, C] logits

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The forward as a chain of functions (flatten + first block, each later block with its skip, head), for
        activation checkpointing; the layers are looked up at call time, so converted layers are used."""
        first = [lambda x: self.blocks[0](x.flatten(1))] if len(self.blocks) else [lambda x: x.flatten(1)]
        return [*first, *(partial(_block_stage, self, i) for i in range(1, len(self.blocks))),
                lambda h: self.head(h)]


class ConvNet(nn.Module):
    """EvoJAX's MNIST ConvNet: per block Conv(k x k, 'SAME') -> norm -> act -> MaxPool 2; then Linear.
    With channels [8, 16] on 1x28x28 inputs: 208 + 3,216 + 7,850 = 11,274 parameters."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], n_classes: int, kernel: int = 5,
                 activation: str = "relu", norm: str = "none"):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, (height, width) = input_shape[0], input_shape[1:]
        for out_ch in channels:
            if min(height, width) < 2:
                raise UsageError(f"cnn with {len(channels)} blocks is too deep for inputs {tuple(input_shape)}")
            layers += _without_identity(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2),
                                        _norm_2d(norm, out_ch), ACTIVATIONS[activation](), nn.MaxPool2d(2))
            in_ch, height, width = out_ch, height // 2, width // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_ch * height * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))  # [B, C]

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The forward as a chain of functions (every feature layer, then flatten + head), for checkpointing."""
        return [*(partial(_sequential_stage, self.features, i) for i in range(len(self.features))),
                lambda h: self.head(h.flatten(1))]


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 inputs (the first conv pads by 2, as for MNIST's 32x32 originals)."""

    def __init__(self, input_shape: tuple[int, ...], n_classes: int, activation: str = "tanh", pool: str = "avg"):
        super().__init__()
        if min(input_shape[1:]) < 16:
            raise UsageError(f"lenet needs images of at least 16x16; got {tuple(input_shape)} (use cnn or mlp)")
        act, pool_cls = ACTIVATIONS[activation], (nn.AvgPool2d if pool == "avg" else nn.MaxPool2d)
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 6, 5, padding=2), act(), pool_cls(2),
            nn.Conv2d(6, 16, 5), act(), pool_cls(2),
        )
        height, width = ((s // 2 - 4) // 2 for s in input_shape[1:])
        self.classifier = nn.Sequential(
            nn.Linear(16 * height * width, 120), act(), nn.Linear(120, 84), act(), nn.Linear(84, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # [B, C]

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The forward as a chain of functions (feature layers, flatten + first classifier layer, the rest)."""
        n = len(self.classifier)
        return [*(partial(_sequential_stage, self.features, i) for i in range(len(self.features))),
                lambda h: self.classifier[0](h.flatten(1)),
                *(partial(_sequential_stage, self.classifier, i) for i in range(1, n))]


def _block_stage(mlp: MLP, i: int, h: torch.Tensor) -> torch.Tensor:
    return h + mlp.blocks[i](h) if mlp.residual else mlp.blocks[i](h)


def _sequential_stage(seq: nn.Sequential, i: int, h: torch.Tensor) -> torch.Tensor:
    return seq[i](h)


def _norm_1d(norm: str, width: int) -> nn.Module:
    return {"none": nn.Identity, "batch": lambda: nn.BatchNorm1d(width), "layer": lambda: nn.LayerNorm(width)}[norm]()


def _norm_2d(norm: str, channels: int) -> nn.Module:
    # LayerNorm over a conv map = GroupNorm with one group (normalises C, H, W per example).
    return {"none": nn.Identity, "batch": lambda: nn.BatchNorm2d(channels),
            "layer": lambda: nn.GroupNorm(1, channels)}[norm]()


def _without_identity(*layers: nn.Module) -> list[nn.Module]:
    """Drop `norm = none` placeholders: each empty module call costs a few microseconds per step."""
    return [layer for layer in layers if not isinstance(layer, nn.Identity)]


def _require_image(kind: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3:
        raise UsageError(f"model {kind!r} needs image inputs [C, H, W]; this dataset gives {tuple(input_shape)}")


def _as_list(value: Any, key: str) -> list:
    if isinstance(value, int):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"{key} must be a list of integers; got {value!r}")
    return list(value)
