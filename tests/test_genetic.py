"""The ga trainer against DEAP itself: its operators in distribution, its selection really used; reproducibility,
batched fitness against a one-by-one loop, elitism on a problem with a known optimum, a tiny run on digits."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from deap import tools
from scipy import stats

from helpers import make_trials, random_batches
from learnbench import population
from learnbench.algorithms.genetic import GeneticAlgorithm, cx_blend, cx_two_point, cx_uniform, mut_gaussian
from learnbench.models import build
from learnbench.runner import run_trial
from learnbench.spec import Batch, TaskInfo

CPU = torch.device("cpu")
SMALL = dict(popsize=12, batch_size=64, candidates=3, elite_batches=2)


def make(model_seed: int = 0, seed: int = 0, d: int = 6, hidden=(8,), **hparams) -> GeneticAlgorithm:
    torch.manual_seed(model_seed)
    trainer = GeneticAlgorithm(**{**SMALL, **hparams})
    trainer.setup(build({"kind": "mlp", "hidden": list(hidden)}, (d,), 3), TaskInfo((d,), 3, 64, CPU),
                  torch.Generator().manual_seed(seed))
    return trainer


batches = random_batches


def flat(model: torch.nn.Module) -> torch.Tensor:
    return population.flatten(model).clone()


# ------------------------------------------------------------------------------------ reproducibility, fitness

@pytest.mark.parametrize("hparams", [{}, {"variant": "such2017", "truncation": 4},
                                     {"operators": "deap", "crossover": "two-point"}])
def test_same_seed_same_result_and_global_random_untouched(hparams):
    outside = random.getstate()
    runs = []
    for seed in (0, 0, 1):
        trainer = make(seed=seed, **hparams)
        losses = [float(trainer.step(b).loss) for b in batches(6)]
        runs.append((losses, flat(trainer.eval_model())))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])
    assert random.getstate() == outside  # DEAP ran on the trainer's own `random` state


def test_batched_fitness_equals_one_by_one_and_elite_is_re_evaluated():
    trainer = make(d=20, hidden=(16,), elites=2)
    model = build({"kind": "mlp", "hidden": [16]}, (20,), 3)
    for batch in batches(4, d=20):
        elite = flat(trainer.eval_model())  # what the runner would evaluate before this step
        genomes = trainer._genomes.clone()  # [P, n], this generation
        stats_ = trainer.step(batch)
        one_by_one = []
        for row in genomes:
            population.load(model, row)
            one_by_one.append(F.cross_entropy(model(batch.x), batch.y).item())
        record = trainer.logbook[-1]
        assert record["min"] == pytest.approx(min(one_by_one), rel=1e-5)
        assert record["median"] == pytest.approx(float(np.median(one_by_one)), rel=1e-5)
        assert record["max"] == pytest.approx(max(one_by_one), rel=1e-5)
        # the reported loss is the previous elite's, re-measured on this fresh batch
        population.load(model, elite)
        assert float(stats_.loss) == pytest.approx(F.cross_entropy(model(batch.x), batch.y).item(), rel=1e-5)
        pool = min(trainer._generation - 1, trainer.elite_batches) * 64  # batches seen before this one
        assert stats_.forward_passes == 12 * 64 + (record["nevals"] - 12) * pool


@pytest.mark.parametrize("hparams", [{"sigma": 0.05}, {"variant": "such2017", "truncation": 4, "sigma": 0.05},
                                     {"operators": "deap", "sigma": 0.05, "crossover": "uniform"}])
def test_elite_improves_monotonically_to_known_optimum(hparams):
    # A teacher-labelled linear problem: the optimum (loss -> 0, accuracy 1) is reachable by the student.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 5, generator=g)
    y = (x @ torch.randn(5, 3, generator=g)).argmax(1)
    full = Batch(x, y)  # the same full batch every generation: fitness is deterministic
    trainer = make(d=5, hidden=(), popsize=24, batch_size=256, **hparams)
    start = F.cross_entropy(trainer.eval_model()(x), y).item()
    for _ in range(150):
        trainer.step(full)
    elite = [record["elite"] for record in trainer.logbook]
    # elitism: never worse (beyond float rounding: the pool holds the full batch once, then twice)
    assert all(later <= earlier + 1e-6 for earlier, later in zip(elite[1:], elite[2:]))
    model = trainer.eval_model()
    assert F.cross_entropy(model(x), y).item() == pytest.approx(elite[-1], rel=1e-5)
    assert elite[-1] < 0.5 * start
    assert (model(x).argmax(1) == y).float().mean() > 0.9


@pytest.mark.parametrize("elite_batches", [2, 0])
def test_elite_is_chosen_on_the_held_back_pool_not_on_a_lucky_batch(elite_batches):
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(3, 5, generator=g)
    impostor = teacher[[1, 2, 0]]  # right on the lucky batch only
    labelled = lambda w: Batch(x := torch.randn(128, 5, generator=g), (x @ w.T).argmax(1))
    trainer = make(d=5, hidden=(), popsize=6, batch_size=128, candidates=6, elite_batches=elite_batches,
                   cxpb=0.0, mutpb=0.0)
    for _ in range(2):
        trainer.step(labelled(teacher))  # the pool: batches labelled by the teacher
    as_genome = lambda w: torch.cat([10 * w.flatten(), torch.zeros(3)])  # linear model: weight, then bias
    trainer._genomes[2], trainer._genomes[4] = as_genome(teacher), as_genome(impostor)
    trainer.step(labelled(impostor))  # on this batch the impostor is by far the best
    assert trainer.logbook[-1]["min"] < 0.1
    expected = as_genome(teacher) if elite_batches else as_genome(impostor)
    assert torch.equal(flat(trainer.eval_model()), expected)


# ------------------------------------------------------------------------------- operators vs DEAP's originals

def deap_rows(rows: np.ndarray, operator, pairs: bool, probability: float, seed: int = 0, **kwargs) -> np.ndarray:
    """Apply DEAP's operator as `algorithms.varAnd` does, with probability `probability` per pair or individual."""
    rng, lists = random.Random(seed), [list(map(float, r)) for r in rows]
    state = random.getstate()
    random.setstate(rng.getstate())
    if pairs:
        for a, b in zip(lists[0::2], lists[1::2]):
            if random.random() < probability:
                operator(a, b, **kwargs)
    else:
        for r in lists:
            if random.random() < probability:
                operator(r, **kwargs)
    random.setstate(state)
    return np.array(lists)


def close(ours: float, theirs: float, se: float) -> bool:
    return abs(ours - theirs) <= 5 * se


@pytest.mark.parametrize("indpb", [0.05, 0.5, 1.0])  # sparse (geometric gaps), dense mask, every gene
def test_mut_gaussian_matches_deap_in_distribution(indpb):
    rows, n, sigma, mutpb = 3000, 60, 0.5, 0.4
    ours = mut_gaussian(torch.zeros(rows, n, dtype=torch.float64), sigma, indpb, mutpb,
                        torch.Generator().manual_seed(0))[0].numpy()
    theirs = deap_rows(np.zeros((rows, n)), tools.mutGaussian, False, mutpb, mu=0.0, sigma=sigma, indpb=indpb)
    per_row = [(x != 0).mean(1) for x in (ours, theirs)]  # rows are independent; genes within a row are not
    assert close(per_row[0].mean(), per_row[1].mean(), np.sqrt((per_row[0].var() + per_row[1].var()) / rows))
    assert per_row[1].mean() == pytest.approx(mutpb * indpb, rel=0.1)
    touched_ours, touched_theirs = ours[ours != 0], theirs[theirs != 0]
    assert close(touched_ours.mean(), 0.0, sigma / np.sqrt(touched_ours.size))
    assert close(touched_ours.var(), touched_theirs.var(), sigma**2 * np.sqrt(2 / touched_theirs.size) * 2)
    assert stats.ks_2samp(touched_ours, touched_theirs).pvalue > 1e-3


def test_mut_gaussian_sparse_path_touches_each_gene_at_most_once_and_uniformly():
    genomes, _ = mut_gaussian(torch.zeros(4000, 50), 1.0, 0.02, 1.0, torch.Generator().manual_seed(1))
    per_gene = (genomes != 0).float().mean(0)  # every position equally likely: no edge effect of the gaps
    assert per_gene.mean().item() == pytest.approx(0.02, rel=0.05)
    assert stats.chisquare((genomes != 0).sum(0).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("name", ["blend", "uniform", "two-point"])
def test_crossovers_match_deap_in_distribution(name):
    pairs, n, cxpb = 3000, 40, 0.6
    g = np.random.default_rng(0)
    parents = np.repeat(g.normal(size=(2, n)), pairs, axis=0).reshape(2, pairs, n).transpose(1, 0, 2)
    parents = parents.reshape(2 * pairs, n)  # every pair is (p0, p1): children comparable gene by gene
    vectorised = {"blend": (cx_blend, tools.cxBlend, {"alpha": 0.5}),
                  "uniform": (cx_uniform, tools.cxUniform, {"indpb": 0.3}),
                  "two-point": (cx_two_point, tools.cxTwoPoint, {})}
    ours_op, deap_op, kwargs = vectorised[name]
    ours = ours_op(torch.tensor(parents), cxpb=cxpb, generator=torch.Generator().manual_seed(0), **kwargs)[0].numpy()
    theirs = deap_rows(parents, deap_op, True, cxpb, **kwargs)
    for children in (ours, theirs):
        np.testing.assert_allclose(children[0::2] + children[1::2], parents[0::2] + parents[1::2], atol=1e-9)
    crossed = [(c[0::2] != parents[0::2]).any(1).mean() for c in (ours, theirs)]
    assert close(*crossed, np.sqrt(2 * cxpb * (1 - cxpb) / pairs))
    # gamma: where child 1 lies on the line from parent 1 (0) to parent 2 (1), gene by gene, in crossed pairs
    gammas = []
    for children in (ours, theirs):
        gamma = (children[0::2] - parents[0::2]) / (parents[1::2] - parents[0::2])  # [pairs, n]
        gammas.append(gamma[(children[0::2] != parents[0::2]).any(1)])
    for statistic in (np.mean, np.var, lambda v, axis: (np.abs(v) > 1e-9).mean(axis)):
        ours_, theirs_ = (statistic(gm, axis=1) for gm in gammas)  # one value per crossed pair: independent
        se = np.sqrt(ours_.var() / ours_.size + theirs_.var() / theirs_.size)
        assert close(ours_.mean(), theirs_.mean(), se), (name, ours_.mean(), theirs_.mean())
    if name == "two-point":  # the swapped segment: its first gene and its length
        starts = [np.argmax(gm != 0, axis=1) for gm in gammas]
        lengths = [(gm != 0).sum(1) for gm in gammas]
        assert stats.ks_2samp(*starts).pvalue > 1e-3 and stats.ks_2samp(*lengths).pvalue > 1e-3
    else:
        assert stats.ks_2samp(gammas[0].ravel()[:20000], gammas[1].ravel()[:20000]).pvalue > 1e-3


# ----------------------------------------------------------------------------------- DEAP's selection is used

@pytest.mark.parametrize("variant, patched", [("classic", "selTournament"), ("such2017", "selRandom"),
                                              ("such2017", "selBest")])
def test_deap_selection_is_called_and_decides_the_parents(monkeypatch, variant, patched):
    calls, picked = [], []
    original = getattr(tools, patched)

    def spy(individuals, k, *args, **kwargs):
        calls.append(k)
        if patched == "selBest":
            return original(individuals, k, *args, **kwargs)
        picked.append(int(individuals[-1]))
        return [individuals[-1]] * k  # every parent: one individual (a row index carrying its fitness)

    monkeypatch.setattr(tools, patched, spy)
    trainer = make(variant=variant, truncation=4, cxpb=0.0, mutpb=0.0, indpb=0.0)
    before = trainer._genomes.clone()
    trainer.step(batches(1)[0])
    assert calls
    if patched != "selBest":
        assert calls == [trainer._popsize - trainer.elites]
        offspring = trainer._genomes[trainer.elites:]  # unvaried copies of the one parent DEAP returned
        assert all(torch.equal(row, before[picked[0]]) for row in offspring)


# ------------------------------------------------------------------------------------------ runner, settings

def test_tiny_run_on_digits_learns_and_set_keys_work():
    suite = {"algorithms": [{"id": "ga", "batch_size": 128, "popsize": 16, "candidates": 3, "elite_batches": 2}],
             "budget": {"steps": 150}}
    trial = make_trials(suite, sets=["ga.sigma=0.01", "ga.variant=such2017", "ga.truncation=4"])[0]
    assert trial.hparams["sigma"] == 0.01 and trial.hparams["variant"] == "such2017"
    result = run_trial(trial, None)
    assert result.status == "done", result.error
    assert result.metrics["test/accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert result.metrics["cost/forward_passes"] > 150 * 16 * 128


@pytest.mark.parametrize("bad", [{"variant": "nsga2"}, {"crossover": "one-point"}, {"elites": 12},
                                 {"cxpb": 1.5}, {"sigma": -1.0}, {"candidates": 0}])
def test_bad_hyper_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        make(**bad)
