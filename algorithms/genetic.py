"""Genetic algorithm over network weights, built on DEAP (Fortin et al. 2012, "DEAP: Evolutionary Algorithms Made
Easy", JMLR 13; github.com/DEAP/deap), in two variants:

* `classic`: DEAP's canonical GA (its "Overview" tutorial, `algorithms.eaSimple`/`varAnd`): population 50,
  tournaments of 3 (`tools.selTournament`), consecutive pairs crossed with probability `cxpb` = 0.5 (blend
  crossover BLX-0.5 by default; uniform and two-point available), offspring mutated with probability `mutpb` = 0.2,
  each gene with probability `indpb` = 0.1 (`tools.mutGaussian`); plus elitism (below).
* `such2017`: the truncation-selection, mutation-only GA of Such, Madhavan, Conti, Lehman, Stanley & Clune 2017,
  "Deep Neuroevolution: Genetic Algorithms Are a Competitive Alternative for Training Deep Neural Networks for
  Reinforcement Learning", arXiv:1712.06567, Algorithm 1: population 1000, parents drawn uniformly from the top
  `truncation` = 20 (`tools.selBest` then `tools.selRandom`), every weight mutated by N(0, sigma^2), sigma = 0.002,
  one elite carried over unmutated, chosen among the 10 best by fitness re-measured on extra data.

Both start, as Such et al. do, from a population of independently initialised networks (the model's own
`reset_parameters`; row 0 is the model as given). The optional exponential decay of sigma (`sigma_decay`,
`sigma_min`) is off by default.

DEAP without its per-individual cost. Genomes are the rows of one population array `[P, n_params]`; a DEAP
individual (`creator.LearnbenchGARow`) is an `int` (its row) carrying a `fitness` and a view of its genome, so DEAP's
selection, `tools.HallOfFame`, `tools.Statistics` and `tools.Logbook` run unchanged on P lightweight objects while
genomes never leave the array (the selected rows are gathered with one `index_select`). The toolbox's `evaluate`
scores the whole array in one batched call (`learnbench.population.evaluate`: every individual on the same
minibatch); its `mate` and `mutate` are vectorised operators over the whole offspring array drawing from the
trainer's `torch.Generator`, equal in distribution to `tools.cxBlend`, `tools.cxUniform`, `tools.cxTwoPoint` and
`tools.mutGaussian` (tests/test_genetic.py). `operators = "deap"` registers DEAP's originals instead, on list
genomes (one Python call per gene: the slow reference). DEAP draws from Python's `random` module: the
trainer swaps in its own state (seeded from its generator) around every DEAP call, so runs are reproducible and
other users of `random` are left alone.

Noisy fitness. Every generation is evaluated on a fresh minibatch, elites included, so a lucky minibatch cannot
keep a bad elite. As in Such et al., the elites are then chosen among the `candidates` best of the generation plus
the current elites by their mean loss on held-back data: the `elite_batches` minibatches `step` received before
this one (a trainer cannot read the dataset, so it keeps a ring buffer of copies of what it has seen; the
candidates were ranked on the current batch, so these examples are fresh to that ranking). The `tools.HallOfFame`
holding the elites (copies of their genomes) is rebuilt every generation: losses measured on different data cannot
be compared, and DEAP's best-ever hall of fame would keep a lucky winner forever. `eval_model()` loads its best.
All of this runs inside `step`, on the clock and counted in `forward_passes`.

Declared cost (`StepStats.extra_flops`, by `learnbench.cost`'s rule, every random number drawn counting 1 like a
normal), per generation, n genes: what the operators actually did, since how many pairs cross, rows mutate and
numbers are drawn is random. Selection: one draw per aspirant (sorting, comparing and gathering are free). A uniform
per decision (a pair crosses, an offspring mutates) when its probability is below 1 (DEAP's `varAnd`: always).
Per crossing pair: blend 7 n (gamma drawn, scaled and shifted; delta = gamma (b - a); a + delta, b - delta),
uniform n draws, two-point 2 draws. Per mutated gene 3 (a normal, sigma * z, the addition), plus the draws that pick
the genes: none when every gene mutates, the sparse path's Geometric gaps, or a uniform per gene of the mutated
rows (DEAP's `mutGaussian`; and the dense path, which also scales and masks every gene of those rows: 5 per gene
of them in all). DEAP's originals are charged the arithmetic of the vectorised operators they equal, with their own
draws. Model passes, the elites' re-evaluation included, are in `forward_passes`; `setup`'s initial population
belongs to no step.
"""

from __future__ import annotations

import copy
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator, Literal

import numpy as np
import torch
from deap import base, creator, tools
from torch import Tensor, nn

from learnbench import population
from learnbench.search_space import Choice, Dimension, IntRange, LogUniform, Uniform
from learnbench.spec import Batch, StepStats, TaskInfo

VARIANTS = ("classic", "such2017")
CROSSOVERS = ("blend", "uniform", "two-point")
OPERATORS = ("vectorised", "deap")
# Published values the `None` defaults resolve to, per variant: DEAP's Overview tutorial (classic) and
# Such et al. 2017 (every weight mutated, sigma 0.002).
VARIANT_DEFAULTS = {"classic": {"popsize": 50, "mutpb": 0.2, "indpb": 0.1, "sigma": 0.002},
                    "such2017": {"popsize": 1000, "mutpb": 1.0, "indpb": 1.0, "sigma": 0.002}}
SPARSE_INDPB = 0.2  # below this, mutated genes are found by geometric gaps instead of a dense mask (cheaper)
LOGBOOK_GENERATIONS = 10_000  # the logbook keeps the statistics of this many last generations


@dataclass(eq=False)
class GeneticAlgorithm:
    """Genetic algorithm on flat weight vectors: DEAP's selection and bookkeeping, vectorised variation.

    After `setup`, `logbook` is a DEAP `tools.Logbook` of the last generations: `gen`, `nevals` (individuals
    evaluated, candidates re-scored on the pool included), the `min`/`median`/`max` minibatch loss of the
    population and the `elite`'s loss on the held-back pool."""

    name: ClassVar[str] = "ga"

    variant: Literal["classic", "such2017"] = "classic"
    """classic (tournament, crossover + mutation, DEAP's tutorial) or such2017 (truncation, mutation only)."""
    popsize: int | None = None
    """Individuals per generation; None: 50 classic (DEAP's tutorial), 1000 such2017 (Such et al., Atari)."""
    batch_size: int = 256
    """Examples in the minibatch every individual of a generation is evaluated on."""
    tournsize: int = 3
    """classic: individuals per tournament (DEAP's tutorial: 3)."""
    truncation: int = 20
    """such2017: parents are drawn uniformly from this many best individuals (Such et al.: T = 20)."""
    elites: int = 1
    """Best individuals copied unmutated into the next generation (Such et al.: 1)."""
    candidates: int = 10
    """Best individuals of a generation re-evaluated on the held-back pool to pick the elites (Such et al.: 10)."""
    elite_batches: int = 2
    """Minibatches in the held-back pool the candidates are scored on (Such et al.: 30 extra episodes)."""
    cxpb: float = 0.5
    """classic: probability that a consecutive pair of offspring is crossed (DEAP's tutorial: 0.5)."""
    crossover: Literal["blend", "uniform", "two-point"] = "blend"
    """classic: blend (cxBlend), uniform (cxUniform) or two-point (cxTwoPoint)."""
    alpha: float = 0.5
    """Blend crossover's extension of the parents' interval (BLX-0.5, Eshelman & Schaffer 1993)."""
    cx_indpb: float = 0.5
    """Uniform crossover: probability that a gene is swapped (Syswerda 1989: 0.5)."""
    mutpb: float | None = None
    """Probability that an offspring is mutated; None: 0.2 classic (DEAP's tutorial), 1 such2017."""
    indpb: float | None = None
    """Probability that a gene of a mutated offspring is mutated; None: 0.1 classic (DEAP's tutorial), 1 such2017."""
    sigma: float | None = None
    """Standard deviation of the Gaussian mutation; None: 0.002 (Such et al. 2017)."""
    sigma_decay: float = 1.0
    """Multiply sigma by this after every generation; 1 keeps it constant (the published GAs)."""
    sigma_min: float = 0.0
    """Floor of the decayed sigma."""
    operators: Literal["vectorised", "deap"] = "vectorised"
    """vectorised (whole-array operators) or deap (DEAP's per-individual originals: the reference, slow)."""
    chunk_size: int | None = None
    """Individuals evaluated at once; None sizes chunks to `learnbench.population.DEFAULT_MEMORY_BYTES`."""

    # For the default variant, classic; every corner keeps elites <= candidates (2 or more) and popsize >= 20
    # (such2017's default truncation), so no combination of the ranges contradicts validate().
    search_space: ClassVar[dict[str, Dimension]] = {
        # A decade either side of Such et al.'s mutation power 0.002 (DEAP's tutorial mutates a toy problem with
        # sigma 1: no guide for network weights).
        "sigma": LogUniform(2e-4, 2e-2),
        # From DEAP's tutorial (mutpb 0.2, indpb 0.1) to Such et al. (every offspring, every weight): mutpb down to
        # half the tutorial's, indpb a decade below it, log-uniform (the share of weights changed spans decades).
        "mutpb": Uniform(0.1, 1.0),
        "indpb": LogUniform(0.01, 1.0),
        # DEAP's eaSimple keeps no elite, Such et al. keep 1: 0 to 2 (elites are picked among the `candidates`,
        # which the built-in suites set to 2).
        "elites": IntRange(0, 2),
        # Powers of two from below DEAP's tutorial population (50) to Such et al.'s (1000, Atari).
        "popsize": Choice((32, 64, 128, 256, 512, 1024)),
    }

    def setup(self, model: nn.Module, task: TaskInfo, generator: torch.Generator) -> None:
        self.validate()
        defaults = VARIANT_DEFAULTS[self.variant]
        self._popsize, self._mutpb, self._indpb, self._sigma = (
            defaults[key] if getattr(self, key) is None else getattr(self, key)
            for key in ("popsize", "mutpb", "indpb", "sigma"))
        self._model, self._generator, self._device = model, generator, task.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        self._random_state = random.Random(seed).getstate()  # DEAP's selection draws from Python's `random`
        self._genomes = initial_population(model, self._popsize, generator)  # [P, n_params]
        self._toolbox = self._make_toolbox()
        self._hof = tools.HallOfFame(max(1, self.elites))
        self._stats = tools.Statistics(key=lambda ind: ind.fitness.values[0])
        for stat in ("min", "median", "max"):
            self._stats.register(stat, getattr(np, stat))
        self.logbook = tools.Logbook()
        self.logbook.header = ["gen", "nevals", "min", "median", "max", "elite"]
        self._pool: list[tuple[Tensor, Tensor]] = []  # the last `elite_batches` minibatches, oldest first
        self._generation = 0

    def validate(self) -> None:
        """Check hyper-parameter values; raises ValueError naming the bad one."""
        for key, allowed in (("variant", VARIANTS), ("crossover", CROSSOVERS), ("operators", OPERATORS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}; got {getattr(self, key)!r}")
        popsize = VARIANT_DEFAULTS[self.variant]["popsize"] if self.popsize is None else self.popsize
        if popsize < 2 or self.batch_size <= 0 or self.tournsize < 1 or self.elite_batches < 0:
            raise ValueError("popsize must be >= 2, batch_size and tournsize >= 1, elite_batches >= 0")
        if not 0 <= self.elites < popsize or not 1 <= self.candidates <= popsize:
            raise ValueError(f"need 0 <= elites < popsize and 1 <= candidates <= popsize; got elites "
                             f"{self.elites}, candidates {self.candidates}, popsize {popsize}")
        if self.elites > self.candidates:
            raise ValueError(f"elites ({self.elites}) must not exceed candidates ({self.candidates})")
        if self.variant == "such2017" and not 1 <= self.truncation <= popsize:
            raise ValueError(f"truncation must be in [1, popsize]; got {self.truncation}")
        for key in ("cxpb", "cx_indpb", "mutpb", "indpb"):
            value = getattr(self, key)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{key} must be a probability in [0, 1]; got {value}")
        if (self.sigma is not None and self.sigma <= 0) or self.alpha < 0:
            raise ValueError("sigma must be positive and alpha non-negative")

    def _make_toolbox(self) -> base.Toolbox:
        _deap_types()
        toolbox = base.Toolbox()
        toolbox.register("evaluate", population.evaluate, self._model, chunk_size=self.chunk_size)
        if self.variant == "classic":
            toolbox.register("select", tools.selTournament, tournsize=self.tournsize)
        else:
            toolbox.register("select", select_truncation, truncation=self.truncation)
        toolbox.register("candidates", tools.selBest, k=self.candidates)
        cx_deap = {"blend": (tools.cxBlend, {"alpha": self.alpha}), "uniform": (tools.cxUniform, {"indpb":
                   self.cx_indpb}), "two-point": (tools.cxTwoPoint, {})}[self.crossover]
        if self.operators == "deap":  # per individual, Python's `random` (swapped to ours around every call)
            toolbox.register("mate", cx_deap[0], **cx_deap[1])
            toolbox.register("mutate", tools.mutGaussian, mu=0.0, indpb=self._indpb)  # sigma: at each call
        else:  # the whole offspring array at once, the trainer's generator
            cx = {"blend": cx_blend, "uniform": cx_uniform, "two-point": cx_two_point}[self.crossover]
            toolbox.register("mate", cx, cxpb=self.cxpb, generator=self._generator, **cx_deap[1])
            toolbox.register("mutate", mut_gaussian, indpb=self._indpb, mutpb=self._mutpb, generator=self._generator)
        return toolbox

    def step(self, batch: Batch) -> StepStats:
        p, b = self._popsize, batch.y.shape[0]
        scored, learning, learning_flops = self._scored(batch)  # [P, n_params]: what this generation is scored as
        loss, _ = self._toolbox.evaluate(scored, batch.x, batch.y)  # [P], all on the same minibatch
        individuals = self._individuals(loss)
        with self._python_random():
            parents = self._toolbox.select(individuals, p - self.elites)  # DEAP's own selection
        record = self._stats.compile(individuals)  # before the candidates' fitness is replaced by the pool's
        pool_evals = self._choose_elites(individuals, scored)  # refills the hall of fame (fitness on the pool)
        offspring, flops = self._vary(self._genomes.index_select(0, torch.tensor(parents, device=self._device)))
        elites = [ind.genome for ind in self._hof[:self.elites]]
        self._genomes = torch.cat([torch.stack(elites), offspring]) if elites else offspring  # [P, n_params]
        self.logbook.record(gen=self._generation, nevals=p + len(pool_evals[0]),
                            elite=self._hof[0].fitness.values[0], **record)
        if len(self.logbook) > LOGBOOK_GENERATIONS:
            del self.logbook[0]
        self._remember(batch)
        self._generation += 1
        self._sigma = max(self._sigma * self.sigma_decay, self.sigma_min)
        # The loss reported is row 0's: the current elite (the model `eval_model()` returned before this step),
        # re-measured on this fresh batch, so it is an unbiased training loss; generation 0: the given model.
        aspirants = len(parents) * (self.tournsize if self.variant == "classic" else 1)  # one draw each
        # The logbook's record of this generation: min/median/max minibatch loss of the population (a NaN member
        # counts as +inf) and the elite's loss on the held-back pool; already host floats.
        metrics = {f"fitness/{key}": float(self.logbook[-1][key]) for key in ("min", "median", "max", "elite")}
        return StepStats(loss=loss[0], forward_passes=p * b + pool_evals[1] + learning, backward_passes=learning,
                         extra_flops=float(aspirants + flops + learning_flops), metrics=metrics)

    def _scored(self, batch: Batch) -> tuple[Tensor, int, float]:
        """The population as this generation scores it `[P, n_params]`, with the example-passes (each way) and
        FLOPs spent making it: the genomes themselves here; `memetic` scores them after their local learning."""
        return self._genomes, 0, 0.0

    def eval_model(self) -> nn.Module:
        if len(self._hof):
            population.load(self._model, self._hof[0].genome)
        return self._model

    def _individuals(self, loss: Tensor) -> list:
        """One lightweight DEAP individual per row: its index, its fitness, a view of its genome."""
        values = torch.nan_to_num(loss, nan=math.inf).tolist()  # a NaN member is the worst, never the best
        individuals = []
        for row, value in enumerate(values):
            ind = creator.LearnbenchGARow(row)
            ind.fitness.values = (value,)
            ind.genome = self._genomes[row]
            individuals.append(ind)
        return individuals

    def _choose_elites(self, individuals: list, scored: Tensor) -> tuple[list, int]:
        """Score the candidates (the generation's best and the current elites, rows 0..elites-1) by their mean
        loss on the held-back pool (their rows of `scored`, as this generation ranked them) and refill the hall of
        fame with the best (their genomes); returns (candidates, passes)."""
        chosen = {int(ind): ind for ind in self._toolbox.candidates(individuals)}
        chosen.update({int(ind): ind for ind in individuals[:self.elites] if self._generation})
        candidates, passes = list(chosen.values()), 0
        if self._pool:
            x, y = (torch.cat(parts) for parts in zip(*self._pool))
            rows = torch.tensor(list(chosen), device=self._device)
            pooled, _ = self._toolbox.evaluate(scored.index_select(0, rows), x, y)  # [C]
            for ind, value in zip(candidates, torch.nan_to_num(pooled, nan=math.inf).tolist()):
                ind.fitness.values = (value,)
            passes = len(candidates) * y.shape[0]
        self._hof.clear()
        self._hof.update(candidates)  # copies the winners' genomes (LearnbenchGARow.__deepcopy__)
        return candidates, passes

    def _vary(self, offspring: Tensor) -> tuple[Tensor, float]:
        """Crossover (classic) then mutation of `offspring [N, n_params]`, like DEAP's `algorithms.varAnd`; returns
        the new offspring and the FLOPs spent (module docstring)."""
        cxpb = self.cxpb if self.variant == "classic" else 0.0
        if self.operators == "vectorised":
            crossed, flops = self._toolbox.mate(offspring) if cxpb else (offspring, 0.0)
            mutated, more = self._toolbox.mutate(crossed, sigma=self._sigma)
            return mutated, flops + more
        rows = offspring.tolist()  # DEAP's sequence individuals; its operators change them in place
        n = offspring.shape[1]
        per_pair = {"blend": 7 * n, "uniform": n, "two-point": 2}[self.crossover]
        flops = float(len(rows) // 2 + len(rows))  # varAnd's decisions: one uniform per pair and per offspring
        with self._python_random():
            for first, second in zip(rows[0::2], rows[1::2]):
                if random.random() < cxpb:
                    self._toolbox.mate(first, second)
                    flops += per_pair
            for row in rows:
                if random.random() < self._mutpb:
                    before = list(row)
                    self._toolbox.mutate(row, sigma=self._sigma)
                    flops += n + 3 * sum(a != b for a, b in zip(before, row))  # a uniform per gene; 3 per hit
        return torch.tensor(rows, dtype=offspring.dtype, device=offspring.device), flops

    def _remember(self, batch: Batch) -> None:
        if self.elite_batches:
            self._pool = [*self._pool, (batch.x.clone(), batch.y.clone())][-self.elite_batches:]

    @contextmanager
    def _python_random(self) -> Iterator[None]:
        """Run DEAP code on this trainer's own `random` state, restoring the caller's afterwards."""
        outside = random.getstate()
        random.setstate(self._random_state)
        try:
            yield
        finally:
            self._random_state = random.getstate()
            random.setstate(outside)


# ------------------------------------------------------------------------------------------------ pure helpers

def select_truncation(individuals: list, k: int, truncation: int) -> list:
    """Such et al.'s selection: `k` parents drawn uniformly (with replacement) from the `truncation` best."""
    return tools.selRandom(tools.selBest(individuals, truncation), k)


def mut_gaussian(genomes: Tensor, sigma: float, indpb: float, mutpb: float,
                 generator: torch.Generator) -> tuple[Tensor, float]:
    """`tools.mutGaussian(ind, mu=0, sigma, indpb)` applied with probability `mutpb` to every row of `genomes
    [N, n]`, in place; returns `(genomes, flops)` (module docstring). Small `indpb`: the mutated genes are the
    arrivals of a Bernoulli process, found from Geometric(indpb) gaps (exactly the same law as one draw per gene,
    ~n * indpb draws instead of n)."""
    flops = float(genomes.shape[0]) if mutpb < 1 else 0.0  # `_chosen`'s uniforms
    rows = _chosen(genomes.shape[0], mutpb, generator, genomes.device)  # [M] rows to mutate
    if rows.numel() == 0 or indpb == 0:
        return genomes, flops
    m, n = rows.numel(), genomes.shape[1]
    if indpb >= 1:
        genomes[rows] += sigma * _randn(generator, (m, n), genomes)
        return genomes, flops + 3 * m * n  # a normal, sigma * z, + per gene
    if indpb <= SPARSE_INDPB:
        position = _arrivals(m, n, indpb, generator, genomes.device)  # [M, K], -1 after a row's last arrival
        flat = (rows[:, None] * n + position)[position >= 0]  # indices into the flattened array
        genomes.view(-1).index_add_(0, flat, sigma * _randn(generator, flat.shape, genomes))
        return genomes, flops + position.numel() + 3 * flat.numel()  # every gap drawn; 3 per mutated gene
    hit = torch.rand(m, n, generator=generator, device=generator.device).to(genomes.device) < indpb
    genomes[rows] += sigma * _randn(generator, (m, n), genomes) * hit
    return genomes, flops + 5 * m * n  # a uniform, a normal, sigma *, * hit, + per gene of the mutated rows


def cx_blend(offspring: Tensor, alpha: float, cxpb: float, generator: torch.Generator) -> tuple[Tensor, float]:
    """`tools.cxBlend(a, b, alpha)` on the pairs (0, 1), (2, 3), ... of `offspring [N, n]` that cross (probability
    `cxpb` each), in place: per gene `gamma ~ U(-alpha, 1 + alpha)`, `a' = (1-gamma) a + gamma b`,
    `b' = gamma a + (1-gamma) b`. Returns `(offspring, flops)`."""
    first, second, flops = _pairs(offspring.shape[0], cxpb, generator, offspring.device)
    if first.numel():
        a, b = offspring[first], offspring[second]  # [K, n] each
        gamma = (1 + 2 * alpha) * _rand(generator, a.shape, a) - alpha
        delta = gamma * (b - a)
        offspring[first], offspring[second] = a + delta, b - delta
        flops += 7 * a.numel()  # per gene: the draw, 2 for gamma, 2 for delta, the two children
    return offspring, flops


def cx_uniform(offspring: Tensor, indpb: float, cxpb: float, generator: torch.Generator) -> tuple[Tensor, float]:
    """`tools.cxUniform(a, b, indpb)` on the crossing pairs of `offspring [N, n]`: each gene swapped with
    probability `indpb`. Returns `(offspring, flops)`."""
    first, second, flops = _pairs(offspring.shape[0], cxpb, generator, offspring.device)
    if first.numel():
        a, b = offspring[first], offspring[second]
        swap = _rand(generator, a.shape, a) < indpb  # [K, n]
        offspring[first], offspring[second] = torch.where(swap, b, a), torch.where(swap, a, b)
        flops += a.numel()  # a uniform per gene; the swap itself is a selection
    return offspring, flops


def cx_two_point(offspring: Tensor, cxpb: float, generator: torch.Generator) -> tuple[Tensor, float]:
    """`tools.cxTwoPoint(a, b)` on the crossing pairs of `offspring [N, n]`: the genes between two cut points,
    drawn as DEAP draws them, are swapped. Returns `(offspring, flops)`."""
    first, second, flops = _pairs(offspring.shape[0], cxpb, generator, offspring.device)
    k, n = first.numel(), offspring.shape[1]
    if k:
        # DEAP: c1 = randint(1, n), c2 = randint(1, n - 1); c2 += 1 if c2 >= c1, else the two are swapped.
        cuts = torch.stack([torch.randint(1, n + 1, (k,), generator=generator, device=generator.device),
                            torch.randint(1, n, (k,), generator=generator, device=generator.device)])
        cuts[1] += cuts[1] >= cuts[0]
        low, high = cuts.min(0).values.to(offspring.device), cuts.max(0).values.to(offspring.device)
        genes = torch.arange(n, device=offspring.device)
        swap = (genes >= low[:, None]) & (genes < high[:, None])  # [K, n]
        a, b = offspring[first], offspring[second]
        offspring[first], offspring[second] = torch.where(swap, b, a), torch.where(swap, a, b)
        flops += 2 * k  # the two cut points drawn per pair; no float arithmetic
    return offspring, flops


@torch.no_grad()
def initial_population(model: nn.Module, size: int, generator: torch.Generator) -> Tensor:
    """`[size, n_params]`: row 0 is the model as given, the others independent initialisations by the model's own
    `reset_parameters` (Such et al.: a population of randomly initialised networks), drawn under `fork_rng` from a
    seed taken from `generator` so the global random state is left as it was."""
    given = population.flatten(model)
    owners = [m for m in model.modules()
              if hasattr(m, "reset_parameters") and next(m.parameters(recurse=False), None) is not None]
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    rows = [given]
    with torch.random.fork_rng(devices=[given.device] if given.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(size - 1):
            for module in owners:
                module.reset_parameters()
            rows.append(population.flatten(model))
    population.load(model, given)
    return torch.stack(rows)


def _deap_types() -> None:
    """Create the DEAP classes once per process (creator is global state), under learnbench-specific names."""
    if not hasattr(creator, "LearnbenchGAFitness"):
        creator.create("LearnbenchGAFitness", base.Fitness, weights=(-1.0,))  # a loss: minimised
    if not hasattr(creator, "LearnbenchGARow"):
        creator.create("LearnbenchGARow", int, fitness=creator.LearnbenchGAFitness, __deepcopy__=_copy_row)


def _copy_row(ind: int, memo: dict) -> int:
    """Deep copy of an individual (what `HallOfFame.insert` makes): its own copy of the genome row only."""
    twin = type(ind)(int(ind))
    twin.fitness = copy.deepcopy(ind.fitness, memo)
    twin.genome = ind.genome.clone()
    return twin


def _chosen(n: int, probability: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Indices of the `n` items that pass a Bernoulli(`probability`) draw each."""
    if probability >= 1:
        return torch.arange(n, device=device)
    return torch.nonzero(torch.rand(n, generator=generator, device=generator.device) < probability)[:, 0].to(device)


def _pairs(n: int, cxpb: float, generator: torch.Generator,
           device: torch.device) -> tuple[Tensor, Tensor, float]:
    """First and second rows of the consecutive pairs (0, 1), (2, 3), ... that cross, and the uniforms drawn to
    decide (none when `cxpb` >= 1)."""
    first = 2 * _chosen(n // 2, cxpb, generator, device)
    return first, first + 1, float(n // 2) if cxpb < 1 else 0.0


def _arrivals(rows: int, n: int, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Positions `[rows, K]` of the successes among `n` Bernoulli(`p`) trials per row, -1 after the last one."""
    width = math.ceil(n * p + 8 * math.sqrt(n * p) + 16)  # enough gaps to pass n, but for ~1e-15 of rows
    gaps = torch.empty(rows, width, device=generator.device).geometric_(p, generator=generator)  # in {1, 2, ...}
    position = gaps.to(device=device, dtype=torch.int64).cumsum(1) - 1
    while bool((position[:, -1] < n).any()):  # a row has not passed the last gene yet: draw more gaps
        more = torch.empty(rows, width, device=generator.device).geometric_(p, generator=generator)
        more = more.to(device=device, dtype=torch.int64).cumsum(1) + position[:, -1:]
        position = torch.cat([position, more], 1)
    return torch.where(position < n, position, -1)


def _randn(generator: torch.Generator, shape: tuple, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(like.device, like.dtype)


def _rand(generator: torch.Generator, shape: tuple, like: Tensor) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device, like.dtype)
