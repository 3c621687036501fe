"""learnbench.population against a plain per-member loop (load each row into the module, call it); the noise table
(learnbench.noise) and what an installed backend (learnbench.population_backend) receives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learnbench import population, population_backend, population_engines
from learnbench.models import build
from learnbench.noise import NoiseTable, drawn_from, normal

SPECS = [
    ({"kind": "mlp", "hidden": [32]}, (1, 8, 8), "MLPEngine"),
    ({"kind": "mlp", "hidden": []}, (1, 8, 8), "MLPEngine"),
    ({"kind": "mlp", "hidden": [16, 8], "activation": "tanh"}, (12,), "MLPEngine"),
    ({"kind": "resmlp", "hidden": [16, 16, 16], "activation": "gelu"}, (1, 8, 8), "MLPEngine"),
    ({"kind": "mlp", "hidden": [16], "norm": "batch"}, (1, 8, 8), "Engine"),
    ({"kind": "mlp", "hidden": [16], "norm": "layer"}, (1, 8, 8), "Engine"),
    ({"kind": "cnn"}, (1, 28, 28), "ConvEngine"),
    ({"kind": "cnn", "channels": [4, 6, 8], "activation": "tanh", "kernel": 3}, (2, 15, 13), "ConvEngine"),
    ({"kind": "cnn", "activation": "gelu"}, (1, 12, 12), "Engine"),  # GELU is not monotone: no fused pooling
    ({"kind": "cnn", "norm": "layer"}, (1, 12, 12), "Engine"),
    ({"kind": "lenet"}, (1, 28, 28), "Engine"),
]


def loop_reference(model: nn.Module, members: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """The obvious implementation: one module call per member, in eval mode."""
    model.eval()
    losses, accs = [], []
    with torch.no_grad():
        for row in members:
            torch.nn.utils.vector_to_parameters(row, model.parameters())
            logits = model(x)
            losses.append(F.cross_entropy(logits, y))
            accs.append((logits.argmax(-1) == y).float().mean())
    return torch.stack(losses), torch.stack(accs)


def case(spec, shape, members=6, batch=24, seed=0):
    torch.manual_seed(seed)
    model = build(spec, shape, 10)
    center = population.flatten(model)
    pop = center + 0.2 * torch.randn(members, center.numel())
    x, y = torch.rand(batch, *shape), torch.randint(0, 10, (batch,))
    return model, center, pop, x, y


@pytest.mark.parametrize("spec,shape,engine", SPECS, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_evaluate_matches_member_loop(spec, shape, engine):
    model, _, pop, x, y = case(spec, shape)
    assert type(population_engines.engine_for(model, x)).__name__ == engine  # the path the docstring promises
    loss, acc = population.evaluate(model, pop, x, y)
    ref_loss, ref_acc = loop_reference(model, pop, x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc, ref_acc)


@pytest.mark.parametrize("spec,shape,engine", SPECS, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_mirrored_matches_explicit_population(spec, shape, engine):
    model, center, _, x, y = case(spec, shape)
    noise = torch.randn(3, center.numel())
    sigma = 0.05 + 0.1 * torch.rand(center.numel())  # per-parameter, as SNES uses it
    explicit = torch.cat([center + sigma * noise, center - sigma * noise])
    loss, acc = population.evaluate_mirrored(model, center, noise, sigma, x, y, chunk_size=2)
    ref_loss, ref_acc = loop_reference(model, explicit, x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc, ref_acc)


@pytest.mark.parametrize("spec,shape", [(s, sh) for s, sh, _ in SPECS[::2]])
def test_chunking_changes_nothing(spec, shape):
    model, center, pop, x, y = case(spec, shape, members=7)
    whole = population.evaluate(model, pop, x, y, chunk_size=7)
    for chunk in (1, 3):
        for a, b in zip(population.evaluate(model, pop, x, y, chunk_size=chunk), whole):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # a memory bound too small for one member still evaluates, one member at a time
    for a, b in zip(population.evaluate(model, pop, x, y, memory_bytes=1), whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_inputs_zero_across_the_batch_are_skipped_exactly():
    model, center, pop, x, y = case({"kind": "mlp", "hidden": [8]}, (1, 8, 8))
    x[:, :, :, :3] = 0  # MNIST-like blank border: 24 of 64 inputs are 0 for every example
    noise = pop[:3] - center
    ref_loss, ref_acc = loop_reference(model, torch.cat([center + noise, center - noise]), x, y)
    loss, acc = population.evaluate_mirrored(model, center, noise, 1.0, x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc, ref_acc)


def test_chunk_size_follows_memory_bound():
    model, _, _, x, _ = case({"kind": "cnn"}, (1, 28, 28), batch=256)
    engine = population_engines.engine_for(model, x)
    small, large = engine.chunk_for(256, 64 * 2**20), engine.chunk_for(256, 1024 * 2**20)
    assert 1 <= small < large
    assert small * engine.member_bytes(256) <= 64 * 2**20


def test_any_functional_module_with_buffers_and_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.BatchNorm1d(20), nn.Dropout(0.5), nn.SiLU(),
                          nn.Linear(20, 10))
    model.train()
    model[2].running_mean.normal_()  # non-trivial stored statistics
    center = population.flatten(model)
    pop = center + 0.1 * torch.randn(5, center.numel())
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    loss, acc = population.evaluate(model, pop, x, y)
    assert model.training  # mode restored
    ref_loss, ref_acc = loop_reference(model, pop, x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc, ref_acc)


def test_frozen_parameters_stay_out_of_the_vector():
    model, _, _, x, y = case({"kind": "mlp", "hidden": [8]}, (1, 8, 8))
    model.blocks[0][0].weight.requires_grad_(False)
    center = population.flatten(model)
    assert center.numel() == 8 + 8 * 10 + 10
    pop = center + 0.2 * torch.randn(4, center.numel())
    loss, _ = population.evaluate(model, pop, x, y)
    model.eval()
    with torch.no_grad():
        ref = [F.cross_entropy(population.load(model, row)(x), y) for row in pop]
    torch.testing.assert_close(loss, torch.stack(ref), rtol=1e-5, atol=1e-5)


def test_flatten_load_roundtrip_and_layout():
    model = build({"kind": "cnn"}, (1, 28, 28), 10)
    layout = population.Layout.of(model)
    assert layout.n_params == 11_274  # the EvoJAX ConvNet
    vector = torch.randn(layout.n_params)
    population.load(model, vector)
    torch.testing.assert_close(population.flatten(model), vector)
    views = layout.unflatten(torch.stack([vector, 2 * vector]))
    torch.testing.assert_close(views["head.bias"][1], 2 * model.head.bias.detach())


def test_non_finite_member_gives_nan_not_error():
    model, _, pop, x, y = case({"kind": "cnn"}, (1, 28, 28))
    pop[2, 5] = float("nan")
    loss, _ = population.evaluate(model, pop, x, y)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()


def test_centered_ranks_and_nan_never_best():
    loss = torch.tensor([0.3, float("nan"), 0.1, 0.2, 5.0])
    utility = population.centered_ranks(loss)
    torch.testing.assert_close(utility, torch.tensor([0.0, -0.5, 0.5, 0.25, -0.25]))
    assert population.rank_order(loss).tolist() == [2, 3, 0, 4, 1]
    assert population.centered_ranks(torch.full((4,), float("nan"))).sum().abs() < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec,shape", [(s, sh) for s, sh, _ in SPECS])
def test_cuda_matches_cpu(spec, shape):
    model, center, pop, x, y = case(spec, shape)
    cpu = population.evaluate(model, pop, x, y)
    model.cuda()
    gpu = population.evaluate(model, pop.cuda(), x.cuda(), y.cuda())
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


def test_perturbed_matches_explicit_population():
    model, center, _, x, y = case({"kind": "cnn"}, (1, 28, 28))
    noise = torch.randn(5, center.numel())
    sigma = 0.05 + 0.1 * torch.rand(center.numel())
    for s, members in ((sigma, torch.addcmul(center, noise, sigma)), (0.1, center + 0.1 * noise)):
        got = population.evaluate_perturbed(model, center, noise, s, x, y, chunk_size=2)
        for a, b in zip(got, population.evaluate(model, members, x, y, chunk_size=2)):
            assert torch.equal(a, b)  # the members `evaluate` would be given, built the same way


def test_noise_rows_name_their_offsets_and_the_recipe_redraws_the_table():
    generator = torch.Generator().manual_seed(5)
    table = NoiseTable(generator, 2**12, 100, torch.device("cpu"))
    noise = table.sample(6)  # [6, 100]
    rows = drawn_from(noise)
    assert rows.table is table and rows.offsets.shape == (6,)
    assert torch.equal(rows.tensor(), noise) and torch.equal(table.rows(rows.offsets), noise)
    again = table.recipe.build()  # what a backend's copy is: bit-identical, same windows for the same offsets
    assert torch.equal(again.table, table.table) and torch.equal(again.rows(rows.offsets), noise)
    assert again.recipe.key() == table.recipe.key()
    other = NoiseTable(torch.Generator().manual_seed(6), 2**12, 100, torch.device("cpu"))
    assert other.recipe.key() != table.recipe.key()
    # only the tensor the table returned is named: a slice, a copy or fresh normals are not
    for plain in (noise[1:], noise.clone(), normal(generator, 6, 100)):
        assert drawn_from(plain) is None


class RecordingBackend:
    """A population_backend.Backend that records what it is given and answers with a visible signature: the table
    offsets of rows drawn from a table, else the sum of each row."""

    def __init__(self):
        self.prepared, self.requests = [], []

    def __str__(self) -> str:
        return "the recording backend"

    def prepare(self, table=None):
        self.prepared.append(table)

    def evaluate(self, request):
        self.requests.append(request)
        signature = request.drawn.offsets.float() if request.drawn is not None else request.rows.sum(1)
        loss = torch.cat([signature, -signature]) if request.mirrored else signature
        return loss, torch.zeros_like(loss)


def test_an_installed_backend_receives_every_call_and_is_restored():
    model, center, pop, x, y = case({"kind": "mlp", "hidden": [8]}, (1, 8, 8))
    backend = RecordingBackend()
    with pytest.raises(RuntimeError, match="inside"):
        with population_backend.evaluated_by(backend):
            population.flatten(model)  # a population method setting up: the backend may start its workers
            table = NoiseTable(torch.Generator().manual_seed(0), 2**12, center.numel(), center.device)
            assert backend.prepared == [None, table]  # told at once: its copies are made off the clock
            noise = table.sample(3)
            offsets = drawn_from(noise).offsets.float()
            loss, _ = population.evaluate_mirrored(model, center, noise, 0.1, x, y)
            assert torch.equal(loss, torch.cat([offsets, -offsets]))
            loss, _ = population.evaluate_perturbed(model, center, noise, 0.1, x, y, chunk_size=2)
            assert torch.equal(loss, offsets)
            fresh = torch.randn(3, center.numel())  # noise_table = 0: rows not drawn from a table
            loss, _ = population.evaluate_mirrored(model, center, fresh, 0.1, x, y)
            assert torch.equal(loss, torch.cat([fresh.sum(1), -fresh.sum(1)]))
            loss, _ = population.evaluate(model, pop, x, y, memory_bytes=2**20)  # a population matrix (cma-es, ga)
            assert torch.equal(loss, pop.sum(1))
            mirrored, perturbed, fresh_call, matrix = backend.requests
            assert mirrored.mirrored and not perturbed.mirrored and perturbed.chunk_size == 2
            assert mirrored.rows is noise and mirrored.drawn.table is table and mirrored.sigma == 0.1
            assert mirrored.center is center and fresh_call.drawn is None and fresh_call.rows is fresh
            assert matrix.rows is pop and matrix.drawn is None and matrix.center is None and matrix.sigma is None
            assert not matrix.mirrored and matrix.memory_bytes == 2**20
            raise RuntimeError("inside")
    assert population_backend.installed() is None  # restored despite the error: in process again
    loss, _ = population.evaluate_mirrored(model, center, noise, 0.1, x, y)
    assert torch.isfinite(loss).all() and len(backend.requests) == 4
