"""The FLOPs the population trainers declare outside the model (`StepStats.extra_flops`): each against its documented
formula recomputed here by hand for a small configuration, and CMA-ES's growth with the dimension (d^2 per generation
for the full covariance, its eigendecompositions included, d for the separable one)."""

from __future__ import annotations

import math

import pytest
import torch

from learnbench.algorithms.cma_es import CMAES, eigendecompositions
from learnbench.algorithms.genetic import GeneticAlgorithm, cx_blend, cx_two_point, cx_uniform, mut_gaussian
from learnbench.algorithms.openai_es import OpenAIES
from learnbench.algorithms.snes import SNES
from learnbench.models import build
from learnbench.spec import Batch, TaskInfo

CPU = torch.device("cpu")
ADAM, SGD, MOMENTUM = 14, 2, 4  # learnbench.cost: FLOPs per parameter of one torch.optim step, no weight decay


def setup(trainer, d_in: int = 6, hidden=(8,), classes: int = 3):
    """`trainer` set up on a small MLP; returns it and its parameter count."""
    torch.manual_seed(0)
    model = build({"kind": "mlp", "hidden": list(hidden)}, (d_in,), classes)
    trainer.setup(model, TaskInfo((d_in,), classes, 64, CPU), torch.Generator().manual_seed(0))
    return trainer, sum(p.numel() for p in model.parameters())


def batches(count: int, d_in: int = 6, size: int = 16, classes: int = 3) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [Batch(torch.rand(size, d_in, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(count)]


# ------------------------------------------------------------------------------------------- openai-es, snes

@pytest.mark.parametrize("noise_table, weight_decay, optimizer, per_param", [
    (2**16, 0.005, "adam", ADAM), (0, 0.005, "adam", ADAM), (2**16, 0.0, "sgd", SGD), (0, 0.01, "momentum", MOMENTUM)])
def test_openai_es_declares_its_documented_formula(noise_table, weight_decay, optimizer, per_param):
    p = 10
    trainer, n = setup(OpenAIES(popsize=p, batch_size=16, noise_table=noise_table, weight_decay=weight_decay,
                                optimizer=optimizer))
    h = p // 2
    expected = ((h * n if not noise_table else 0)  # normals drawn; table windows are a gather
                + 2 * p * n  # mean +- sigma eps
                + 2 * p + h  # centred ranks, pair differences
                + 2 * h * n + n  # g = sum (u+ - u-) eps / P
                + (2 * n if weight_decay else n)  # -g + wd mean
                + per_param * n)  # the optimizer's step, without weight decay of its own
    for batch in batches(3):
        assert trainer.step(batch).extra_flops == expected


@pytest.mark.parametrize("antithetic, noise_table", [(False, 0), (False, 2**16), (True, 0), (True, 2**16)])
def test_snes_declares_its_documented_formula(antithetic, noise_table):
    p = 8
    trainer, d = setup(SNES(popsize=p, batch_size=16, antithetic=antithetic, noise_table=noise_table))
    rows = p // 2 if antithetic else p
    expected = ((rows * d if not noise_table else 0)
                + 2 * p * d  # members
                + (2 * rows if antithetic else 0)  # utilities of the pairs: difference and sum
                + 2 * rows * d  # grad_mu
                + 3 * rows * d + rows + d  # grad_sigma: squares, weighted sum, sum of utilities, subtraction
                + 6 * d)  # mu and sigma updates
    for batch in batches(3):
        assert trainer.step(batch).extra_flops == expected


# ------------------------------------------------------------------------------------------------------- ga

@pytest.mark.parametrize("variant", ["such2017", "classic"])
def test_ga_with_deterministic_operators_declares_its_formula(variant):
    p, elites, tournsize = 12, 1, 3
    trainer, n = setup(GeneticAlgorithm(variant=variant, popsize=p, batch_size=16, candidates=3, elites=elites,
                                        truncation=4, tournsize=tournsize, cxpb=1.0, mutpb=1.0, indpb=1.0))
    offspring = p - elites
    if variant == "such2017":  # truncation: one uniform pick per parent; every gene mutated
        expected = offspring + 3 * offspring * n
    else:  # tournaments of 3 picks; every pair blended (7 per gene); every gene mutated
        expected = offspring * tournsize + 7 * (offspring // 2) * n + 3 * offspring * n
    for batch in batches(3):
        assert trainer.step(batch).extra_flops == expected


def test_ga_deap_operators_declare_their_draws():
    p, elites = 10, 1
    trainer, n = setup(GeneticAlgorithm(popsize=p, batch_size=16, candidates=3, elites=elites, operators="deap",
                                        cxpb=1.0, mutpb=1.0, indpb=1.0, sigma=0.05))
    offspring = p - elites
    # varAnd's decisions (a uniform per pair and per offspring), blend on every pair, and DEAP's mutGaussian: a
    # uniform per gene, then a normal, sigma * z and the addition on each (here: every) gene
    expected = offspring * 3 + (offspring // 2 + offspring) + 7 * (offspring // 2) * n + offspring * (n + 3 * n)
    for batch in batches(2):
        assert trainer.step(batch).extra_flops == expected


@pytest.mark.parametrize("indpb", [0.05, 0.5])  # the sparse (Geometric gaps) and the dense path
def test_mut_gaussian_counts_the_numbers_it_actually_draws(indpb):
    rows, n, mutpb = 400, 60, 0.4
    genomes, flops = mut_gaussian(torch.zeros(rows, n), 0.5, indpb, mutpb, torch.Generator().manual_seed(0))
    chosen = int((torch.rand(rows, generator=torch.Generator().manual_seed(0)) < mutpb).sum())  # its first draws
    if indpb < 0.2:  # one uniform per row to pick it; per mutated row `width` gaps; 3 per mutated gene
        width = math.ceil(n * indpb + 8 * math.sqrt(n * indpb) + 16)
        expected = rows + chosen * width + 3 * int((genomes != 0).sum())
    else:  # one uniform per row; per gene of a mutated row a uniform, a normal and 3 operations
        expected = rows + 5 * chosen * n
    assert 0 < chosen < rows and flops == expected


@pytest.mark.parametrize("operator, per_pair", [(cx_blend, lambda n: 7 * n), (cx_uniform, lambda n: n),
                                                (cx_two_point, lambda n: 2)])
def test_crossovers_count_their_draws_and_arithmetic(operator, per_pair):
    pairs, n, cxpb = 300, 40, 0.6
    parents = torch.stack([torch.zeros(n), torch.ones(n)]).repeat(pairs, 1)  # [2 pairs, n]: (0, 1) each
    kwargs = {cx_blend: {"alpha": 0.5}, cx_uniform: {"indpb": 0.3}, cx_two_point: {}}[operator]
    children, flops = operator(parents.clone(), cxpb=cxpb, generator=torch.Generator().manual_seed(0), **kwargs)
    crossed = int((children[0::2] != 0).any(1).sum())  # a crossed pair changes at least one gene (a.s.)
    assert 0 < crossed < pairs
    assert flops == pairs + crossed * per_pair(n)  # one uniform per pair decides; then the operator's own work


# ---------------------------------------------------------------------------------------------------- cma-es

def cma_flops_per_generation(covariance: str, d: int, generations: int = 40) -> tuple[float, list[float], list]:
    """Mean declared FLOPs per generation of cma-es (popsize 8) on a linear model with d parameters; also every
    step's FLOPs and how many eigendecompositions pycma made in it."""
    d_in = d // 10 - 1  # linear model, 10 classes: 10 d_in + 10 parameters
    trainer, n = setup(CMAES(popsize=8, batch_size=16, covariance=covariance), d_in=d_in, hidden=(), classes=10)
    assert n == d
    per_step, decompositions = [], []
    for batch in batches(generations, d_in=d_in, size=16, classes=10):
        before = eigendecompositions(trainer.es)
        per_step.append(trainer.step(batch).extra_flops)
        decompositions.append(eigendecompositions(trainer.es) - before)
    return sum(per_step) / generations, per_step, decompositions


def test_cma_es_extra_flops_grow_as_d_squared_full_and_d_separable():
    full = [cma_flops_per_generation("full", d)[0] for d in (100, 200, 400)]
    separable = [cma_flops_per_generation("diagonal", d)[0] for d in (100, 200, 400)]
    # full: sampling and updates are O(lambda d^2); the O(d^3) eigendecomposition comes every O(d) generations
    # (pycma: every 3, 5 and 10 generations here), so the amortised total grows ~4x per doubling, not 8x
    for small, large in zip(full, full[1:]):
        assert 3.0 < large / small < 5.5, full
    for small, large in zip(separable, separable[1:]):
        assert large / small == pytest.approx(2.0, rel=0.05), separable


def test_cma_es_charges_9_d_cubed_exactly_when_pycma_decomposes():
    d = 200
    _, per_step, decompositions = cma_flops_per_generation("full", d, generations=12)
    assert sum(decompositions) >= 2 and 0 in decompositions  # pycma decomposes lazily, not every generation
    base = min(per_step)  # a generation without a decomposition: its work does not depend on the data
    for flops, k in zip(per_step, decompositions):
        assert flops == base + k * (9 * d**3 + 2 * d**2 + d)  # Golub & Van Loan's 9 d^3, C symmetrised, sqrt(D^2)
    _, separable, _ = cma_flops_per_generation("diagonal", d, generations=4)
    assert len(set(separable)) == 1  # sep-CMA-ES: never a decomposition
