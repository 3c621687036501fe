"""How `learnbench.population` computes a chunk of members in this process: one engine per model type and device.

Trainers never call this module; they call `learnbench.population`, which flattens, chunks and (for mirrored
pairs) shares the first layer, and hands each chunk's parameters (`{name: [C, *shape]}`) to the engine
`engine_for(model, x)` picks. An engine computes a chunk's logits `[C, B, K]`, in one of three ways chosen per model
type and device from measurements (torch 2.13, one thread of the 2-core AMD EPYC dev machine, P=256, batch 256;
`learnbench perf es` re-measures the whole trainers):

* `MLPEngine`, `mlp` / `resmlp` without norm layers (any device): first layer as one shared-input matmul for the
  whole chunk (`x @ W.view(C*H, D).T`), the rest with `baddbmm`; loss as `logsumexp - target logit`
  (`cross_entropy`). For 784-32-10 the first layer dominates (35 ms for 256 members, 3.3 GFLOP; 17 ms for mirrored
  pairs); a plain member-by-member loop costs 54 ms with parameter copies, and `F.cross_entropy` over `[P*B]` rows
  costs 6.4 ms against 1.1 ms for the direct form. On CPU, inputs that are zero across the whole batch are dropped
  from that matmul (boolean-mask gather: 23 against 27 ms on MNIST batches, where ~240 of 784 pixels are always 0;
  `index_select` was slower).
* `ConvEngine`, `cnn` (EvoJAX ConvNet) without norm layers, monotone activation, CPU: the first convolution as a
  shared `unfold` of the input times all members' kernels, computed separately for the four 2x2 pooling offsets
  and reduced with a running maximum (pooling and bias commute with a monotone activation, so the full-resolution
  map is never stored), in batch tiles that stay in cache: 1.2 ms per member against 7.7 ms for per-member
  `Conv2d` + `MaxPool2d`. Later convolutions run member by member (1.3 ms each: oneDNN's kernel is near peak;
  `vmap` over `Conv2d` and grouped convolutions measured 1.7-2x slower); max pooling as strided maxima (0.4 ms
  against 3.3 ms for `F.max_pool2d` on these NCHW maps). Each member goes through all later layers before the
  next, so its maps stay in cache. P=256: 0.86 s per generation against 3.2 s for a per-member module loop.
* `Engine`, anything else, and the `cnn` on CUDA: `torch.func.vmap` over `torch.func.functional_call` (on CUDA
  vmap turns the convolutions into grouped ones; not measured here: no GPU was lent to this work).

`chunk_for` sizes chunks so that one chunk's activations stay under a memory bound; a member's result does not
depend on which other members share its chunk (measured bit-identical on this CPU for the mlp and the cnn), which is
what lets a backend split a population across processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import MLP, ConvNet

_MONOTONE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.Identity)  # pooling commutes with these
_ELEMENTWISE = (*_MONOTONE, nn.GELU, nn.SiLU)
_TILE_BYTES = 2 * 2**20  # first-conv output tile that stays in L2/L3 cache


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy per member: logits `[C, B, K]`, labels `y [B]` -> `[C]`."""
    # 6x faster than F.cross_entropy over C*B rows on CPU.
    target = logits.gather(-1, y.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return (torch.logsumexp(logits, -1) - target).mean(-1)


class eval_mode:
    """Context manager: `model` in eval mode inside (dropout off, norm layers on stored statistics), its previous
    mode restored on exit."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def engine_for(model: nn.Module, x: Tensor) -> Engine:
    """The fastest engine for `model` on batches like `x` (see the module docstring); built per call: an engine
    caches work that depends on the batch."""
    if not all(p.requires_grad for p in model.parameters()):  # frozen parameters: only the generic path knows them
        return Engine(model, x)
    if isinstance(model, MLP) and _mlp_activations(model) is not None:
        return MLPEngine(model, x)
    if isinstance(model, ConvNet) and x.device.type == "cpu" and _conv_blocks(model) is not None:
        return ConvEngine(model, x)
    return Engine(model, x)


def _mlp_activations(model: MLP) -> list[nn.Sequential] | None:
    """Per hidden block, its layers after the Linear when they are all elementwise (no norm); else None."""
    acts = []
    for block in model.blocks:
        rest = list(block)[1:]
        if not isinstance(block[0], nn.Linear) or not all(isinstance(m, _ELEMENTWISE) for m in rest):
            return None
        acts.append(nn.Sequential(*rest))
    return acts


def _conv_blocks(model: ConvNet) -> list[tuple[int, nn.Conv2d, nn.Sequential]] | None:
    """`(index in features, conv, activations)` per block `Conv2d -> monotone activations -> MaxPool2d(2)`, or
    None when `features` has anything else (a norm layer, another pooling)."""
    layers, blocks, i = list(model.features), [], 0
    while i < len(layers):
        conv, j = layers[i], i + 1
        while j < len(layers) and isinstance(layers[j], _MONOTONE):
            j += 1
        pool = layers[j] if j < len(layers) else None
        if not (isinstance(conv, nn.Conv2d) and conv.stride == (1, 1) and conv.dilation == (1, 1)
                and conv.groups == 1 and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
                and isinstance(pool, nn.MaxPool2d) and pool.kernel_size in (2, (2, 2))
                and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0)) and not pool.ceil_mode):
            return None
        blocks.append((i, conv, nn.Sequential(*layers[i + 1:j])))
        i = j + 1
    return blocks


class Engine:
    """Generic path: `vmap` of `functional_call` over a chunk of members. Subclasses name their first layer's
    weight in `first_weight` and implement `center` and `first` (that layer, linear in its weight) and `finish`
    (everything after it) with faster batched code."""

    first_weight: str | None = None  # None: no shared first layer, `finish` gets the raw input

    def __init__(self, model: nn.Module, x: Tensor):
        self.model = model
        self.n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.buffers = dict(model.named_buffers())
        self.example = x[:1]

    def center(self, x: Tensor, weight: Tensor) -> Tensor:
        """What `first` needs to reuse for mirrored pairs around `weight` (the center's first-layer output)."""
        return self.first(x, weight[None])

    def first(self, x: Tensor, weight: Tensor, shared: Tensor | None = None, scale: float = 1.0) -> Tensor:
        """First-layer output (no bias) for members `scale * weight`, `weight [C, ...]`; with `shared` =
        `center(x, W)`, for the `2C` members `W + scale * weight` then `W - scale * weight`. Only engines that set
        `first_weight` have one; callers check it first."""
        raise TypeError(f"{type(self).__name__} has no shared first layer (first_weight is None)")

    def finish(self, h: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Logits `[C, B, K]` from `h` (the first layer's output, or the input when `first_weight` is None) and the
        chunk's other parameters `{name: [C, *shape]}`."""
        call = lambda p: torch.func.functional_call(self.model, (p, self.buffers), (h,))
        return torch.func.vmap(call)(params)  # [C, B, K]

    def member_bytes(self, batch: int) -> int:
        """Bytes one member needs: twice the sum of every leaf module's output (measured with hooks on a
        one-example forward) per example, plus its parameters twice."""
        per_example = _activation_numel(self.model, self.example)
        return 4 * (2 * batch * per_example + 2 * self.n_params)

    def chunk_for(self, batch: int, memory_bytes: int) -> int:
        """Members per chunk so that a chunk on `batch` examples needs at most `memory_bytes` (at least 1)."""
        return max(1, memory_bytes // self.member_bytes(batch))


class MLPEngine(Engine):
    """learnbench MLP/resmlp without norm layers: shared-input matmul for layer 1, `baddbmm` after."""

    def __init__(self, model: MLP, x: Tensor):
        super().__init__(model, x)
        self.prefixes = [f"blocks.{i}.0" for i in range(len(model.blocks))] + ["head"]
        self.acts = _mlp_activations(model)
        self.residual = model.residual
        self.first_weight = self.prefixes[0] + ".weight"
        self._active: Tensor | bool | None = None

    def first(self, x: Tensor, weight: Tensor, shared: Tensor | None = None, scale: float = 1.0) -> Tensor:
        h = x.flatten(1)  # [B, D]
        active = self.active_inputs(h)
        if active is not None:
            h, weight = h[:, active], weight[..., active]  # boolean mask: faster than index_select here
        c, width = weight.shape[:2]
        z = (h @ weight.reshape(c * width, -1).T).view(h.shape[0], c, width).transpose(0, 1)  # [C, B, H]
        if scale != 1.0:
            z = z * scale  # cheaper on the [C, B, H] output than on the [C, H, D] weights
        return z if shared is None else torch.cat([shared + z, shared - z])

    def active_inputs(self, h: Tensor) -> Tensor | None:
        """Indices of the inputs not zero across the whole batch, when skipping the others saves > 10% (CPU only:
        the test is a host sync on CUDA, where the dense matmul is cheap anyway). Computed once per batch."""
        if self._active is None and h.device.type == "cpu":
            active = h.ne(0).any(0)  # [D]; MNIST batches of 256: ~240 of 784 pixels are always 0
            self._active = active if active.sum() < 0.9 * h.shape[1] else False
        return self._active if self._active is not None and self._active is not False else None

    def finish(self, h: Tensor, params: dict[str, Tensor]) -> Tensor:
        for i, prefix in enumerate(self.prefixes):
            if i > 0:  # h: [C, B, H_in] -> [C, B, H_out]
                z = torch.baddbmm(params[prefix + ".bias"].unsqueeze(1), h, params[prefix + ".weight"].mT)
            else:
                z = h + params[prefix + ".bias"].unsqueeze(1)
            if i == len(self.acts):
                return z  # [C, B, K] logits
            z = self.acts[i](z)
            h = h + z if self.residual and i > 0 else z
        raise AssertionError("unreachable")

    def member_bytes(self, batch: int) -> int:
        widths = sum(w.shape[0] for n, w in self.model.named_parameters() if n.endswith("weight"))
        return 4 * (3 * batch * widths + 2 * self.n_params)


class ConvEngine(Engine):
    """learnbench ConvNet (CPU): shared `unfold` for conv 1 with pooling fused in, per-member later convs."""

    first_weight = "features.0.weight"

    def __init__(self, model: ConvNet, x: Tensor):
        super().__init__(model, x)
        blocks = _conv_blocks(model)
        self.convs = [conv for _, conv, _ in blocks]
        self.acts = [acts for _, _, acts in blocks]
        self.prefixes = [f"features.{i}" for i, _, _ in blocks]
        self._patches: Tensor | None = None

    def patches(self, x: Tensor) -> Tensor:
        """Conv-1 input patches grouped by 2x2 pooling offset: `[4, B, Cin*k*k, Hp*Wp]` (computed once per call)."""
        if self._patches is None:
            conv, (b, _, height, width) = self.convs[0], x.shape
            hp, wp = height // 2, width // 2
            u = F.unfold(x, conv.kernel_size, padding=conv.padding).view(b, -1, height, width)
            u = u[:, :, :2 * hp, :2 * wp].reshape(b, -1, hp, 2, wp, 2)
            self._patches = u.permute(3, 5, 0, 1, 2, 4).reshape(4, b, -1, hp * wp)
        return self._patches

    def center(self, x: Tensor, weight: Tensor) -> Tensor:
        u = self.patches(x)
        return (weight.reshape(weight.shape[0], -1) @ u).unsqueeze(2)  # [4, B, 1, O, S] before pooling

    def first(self, x: Tensor, weight: Tensor, shared: Tensor | None = None, scale: float = 1.0) -> Tensor:
        u = self.patches(x)  # [4, B, K, S]
        c, o, (_, b, _, s) = weight.shape[0], weight.shape[1], u.shape
        w = weight.reshape(c * o, -1) * scale  # [C*O, K]
        # Batch-first [B, 2 or 1, C, O, S]: member p's map is a strided view, copied once by `finish`.
        out = torch.empty(b, 1 if shared is None else 2, c, o, s, dtype=u.dtype, device=u.device)
        tile = max(1, _TILE_BYTES // (4 * c * o * s))
        z = torch.empty(min(tile, b) * c * o * s, dtype=u.dtype, device=u.device)
        side = torch.empty_like(z)
        for lo in range(0, b, tile):  # running max over the 4 offsets = 2x2 max pooling, tile kept in cache
            rows = slice(lo, lo + tile)
            for k in range(4):
                zk = z[:min(tile, b - lo) * c * o * s].view(-1, c * o, s)
                torch.matmul(w, u[k, rows], out=zk)  # [T, C*O, S]
                zk = zk.view(-1, c, o, s)
                if shared is None:
                    _running_max(out[rows, 0], zk, k)
                    continue
                sk = side[:zk.numel()].view_as(zk)
                _running_max(out[rows, 0], torch.add(shared[k, rows], zk, out=sk), k)
                _running_max(out[rows, 1], torch.sub(shared[k, rows], zk, out=sk), k)
        return out.view(b, -1, o, x.shape[2] // 2, x.shape[3] // 2)  # [B, C or 2C, O, Hp, Wp]

    def finish(self, h: Tensor, params: dict[str, Tensor]) -> Tensor:
        # One member at a time through every layer, so its maps stay in cache. Pool and bias commute with the
        # monotone activation: conv -> pool -> +bias -> act is exact.
        logits = []
        for p in range(h.shape[1]):
            z = self.acts[0](h[:, p] + params[self.prefixes[0] + ".bias"][p, :, None, None])  # [B, O, Hp, Wp]
            for conv, act, prefix in zip(self.convs[1:], self.acts[1:], self.prefixes[1:]):
                z = F.conv2d(z, params[prefix + ".weight"][p], params[prefix + ".bias"][p], padding=conv.padding)
                z = act(_max_pool2(z))
            logits.append(F.linear(z.flatten(1), params["head.weight"][p], params["head.bias"][p]))
        return torch.stack(logits)  # [C, B, K]

    def member_bytes(self, batch: int) -> int:
        _, _, height, width = self.example.shape
        maps = 0
        for conv in self.convs:
            height, width = height // 2, width // 2
            maps += conv.out_channels * height * width
        return 4 * (2 * batch * maps + 2 * self.n_params)


def _running_max(out: Tensor, z: Tensor, k: int) -> None:
    if k == 0:
        out.copy_(z)
    else:
        torch.maximum(out, z, out=out)


def _max_pool2(z: Tensor) -> Tensor:
    """`F.max_pool2d(z, 2)` as strided maxima: 8x faster on CPU for the small NCHW maps of the cnn."""
    hp, wp = z.shape[-2] // 2, z.shape[-1] // 2
    rows = torch.maximum(z[..., 0:2 * hp:2, :2 * wp], z[..., 1:2 * hp:2, :2 * wp])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _activation_numel(model: nn.Module, example: Tensor) -> int:
    total = [0]
    hooks = [m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + o.numel()))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad(), eval_mode(model):
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return total[0]
