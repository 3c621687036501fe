"""Search spaces (`learnbench.search_space`): `check`, `corners`, `suggest` through a real Optuna trial, and the
conformance kit's `search_space` check, which every built-in trainer's declared space passes."""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest

from learnbench.algorithms.backprop import Backprop
from learnbench.algorithms.openai_es import OpenAIES
from learnbench.registry import discover
from learnbench.search_space import Choice, IntRange, LogUniform, Uniform, check, corners, is_log, suggest
from learnbench.testing import check_trainer

HPARAMS = {"lr": 1e-3, "momentum": 0.9, "popsize": 64, "optimizer": "adam"}
SPACE = {"lr": LogUniform(1e-4, 1e-2), "momentum": Uniform(0.5, 0.99), "popsize": IntRange(16, 100, 8),
         "optimizer": Choice(("adam", "sgd", "momentum"))}
BUILTINS = sorted((e for e in discover().entries.values() if e.distribution == "learnbench"), key=lambda e: e.name)


# --- check -------------------------------------------------------------------------------------------------------

def test_check_accepts_a_well_formed_space():
    check(SPACE, HPARAMS, "t")
    check({}, HPARAMS, "t")  # tuning nothing is allowed


@pytest.mark.parametrize("space, message", [
    ({"learning_rate": LogUniform(1e-4, 1e-2)}, "'learning_rate', which is not a hyper-parameter"),
    ({"lr": LogUniform(0.0, 1e-2)}, "not positive"),
    ({"lr": LogUniform(1e-2, 1e-4)}, "is empty"),
    ({"momentum": Uniform(0.99, 0.5)}, "is empty"),
    ({"momentum": Uniform("low", 0.5)}, "needs finite bounds"),
    ({"momentum": Uniform(0.5, math.inf)}, "needs finite bounds"),
    ({"popsize": IntRange(16, 100, 0)}, "needs step >= 1"),
    ({"popsize": IntRange(16, 100.5)}, "needs int bounds and step"),
    ({"optimizer": Choice(())}, "non-empty tuple of options"),
    ({"optimizer": Choice("adam")}, "non-empty tuple of options"),  # a string is not a tuple of its letters
    ({"optimizer": Choice((("adam",),))}, "options must be None, bool, int, float or str"),
    ({"lr": (1e-4, 1e-2)}, "is not a LogUniform, Uniform, IntRange or Choice"),
])
def test_check_names_what_is_wrong(space, message):
    with pytest.raises(ValueError, match="^t: ") as info:
        check(space, HPARAMS, "t")
    assert message in str(info.value)


# --- corners -----------------------------------------------------------------------------------------------------

def test_corners_are_every_combination_of_the_extremes():
    assert IntRange(16, 100, 8).corners() == (16, 96)  # the last grid point, not `high`
    assert IntRange(2, 2).corners() == (2, 2)
    assert LogUniform(1e-4, 1e-2).corners() == (1e-4, 1e-2)
    assert Choice((True, False)).corners() == (True, False)
    points = list(corners(SPACE))
    assert len(points) == 2 * 2 * 2 * 3
    assert {tuple(p) for p in points} == {tuple(SPACE)}  # every corner names every dimension, in order
    assert {(p["lr"], p["popsize"], p["optimizer"]) for p in points} == {
        (lr, pop, opt) for lr in (1e-4, 1e-2) for pop in (16, 96) for opt in ("adam", "sgd", "momentum")}
    assert list(corners({})) == [{}]  # no dimension: the defaults themselves


def test_is_log():
    assert is_log(LogUniform(1e-4, 1e-2)) and not is_log(Uniform(0, 1)) and not is_log(IntRange(1, 2))


# --- suggest through Optuna --------------------------------------------------------------------------------------

HAS_OPTUNA = importlib.util.find_spec("optuna") is not None


@pytest.mark.skipif(not HAS_OPTUNA, reason="optuna is not installed (pip install 'optuna>=3.5'): `learnbench tune` "
                                           "and suggest need it")
@pytest.mark.parametrize("sampler", ["random", "qmc", "tpe"])
def test_suggest_draws_inside_the_space_with_matching_optuna_distributions(sampler):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    make = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler,
            "qmc": lambda seed: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)}[sampler]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # QMCSampler's
        study = optuna.create_study(sampler=make(seed=0))
    for _ in range(12):
        trial = study.ask()
        point = suggest(trial, SPACE)
        assert list(point) == list(SPACE)
        assert 1e-4 <= point["lr"] <= 1e-2 and isinstance(point["lr"], float)
        assert 0.5 <= point["momentum"] <= 0.99
        assert point["popsize"] in range(16, 97, 8) and type(point["popsize"]) is int
        assert point["optimizer"] in ("adam", "sgd", "momentum")
        check({}, point, "t")
        study.tell(trial, point["lr"])
    dist = study.trials[-1].distributions
    assert dist["lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert dist["momentum"] == optuna.distributions.FloatDistribution(0.5, 0.99)
    assert dist["popsize"] == optuna.distributions.IntDistribution(16, 96, step=8)
    assert dist["optimizer"] == optuna.distributions.CategoricalDistribution(("adam", "sgd", "momentum"))


# --- the conformance kit's search_space check ----------------------------------------------------------------------

@pytest.mark.parametrize("entry", BUILTINS, ids=lambda e: e.name)
def test_every_builtin_declares_a_space_that_passes_the_check(entry):
    assert "search_space" in vars(entry.cls), f"{entry.name} declares no search_space of its own"
    [result] = check_trainer(entry, only=["search_space"])
    assert result.passed, result.reason
    assert "corner(s) pass" in result.reason


def test_builtin_population_sizes_keep_their_trainers_rules():
    """Every popsize a built-in may be tuned to: even (mirrored pairs, antithetic SNES) and, for the GA, above its
    elites and at least its candidates and such2017's truncation."""
    spaces = {e.name: e.cls.search_space for e in BUILTINS}
    for name in ("openai-es", "snes"):
        assert all(p % 2 == 0 for p in spaces[name]["popsize"].corners()), name
    ga = spaces["ga"]
    assert min(ga["popsize"].corners()) > max(ga["elites"].corners())
    assert min(ga["popsize"].corners()) >= 20 and max(ga["elites"].corners()) <= 10


@dataclass(eq=False)
class _TooHot(Backprop):
    """lr searched up to 10; validate (with a task) refuses lr > 1."""
    name: ClassVar[str] = "too-hot"
    search_space: ClassVar[dict] = {"lr": LogUniform(1e-3, 10.0), "weight_decay": LogUniform(1e-5, 1e-3)}

    def validate(self, task):
        super().validate(task)
        if self.lr is not None and self.lr > 1:
            raise ValueError(f"lr must be at most 1; got {self.lr}")


@dataclass(eq=False)
class _OddPopulation(OpenAIES):
    """popsize searched on odd values too; OpenAIES.validate() (no task) refuses them."""
    name: ClassVar[str] = "odd-population"
    search_space: ClassVar[dict] = {"popsize": IntRange(8, 9)}


@dataclass(eq=False)
class _WrongType(Backprop):
    """A string where backprop's lr is a float."""
    name: ClassVar[str] = "wrong-type-space"
    search_space: ClassVar[dict] = {"lr": Choice(("fast", "slow"))}


@dataclass(eq=False)
class _NoSpace(Backprop):
    name: ClassVar[str] = "no-space"
    search_space: ClassVar[dict | None] = None


def _only(cls: type):
    [result] = check_trainer(cls, only=["search_space"])
    return result


def test_a_space_outside_validate_fails_naming_the_corner_and_the_error():
    result = _only(_TooHot)
    assert not result.passed
    assert "2 of 4 corner(s)" in result.reason
    assert "{'lr': 10.0, 'weight_decay': 1e-05}" in result.reason
    assert "validate() raised ValueError: lr must be at most 1; got 10.0" in result.reason


def test_validate_without_a_task_is_called_without_one():
    result = _only(_OddPopulation)
    assert not result.passed
    assert "{'popsize': 9}" in result.reason and "popsize must be even" in result.reason


def test_a_corner_its_type_hints_refuse_fails():
    result = _only(_WrongType)
    assert not result.passed and "{'lr': 'fast'}" in result.reason and "must be" in result.reason


def test_no_space_is_optional():
    result = _only(_NoSpace)
    assert result.passed and result.reason == "no search_space declared (optional)"


def test_backprop_scales_its_learning_rate_range_to_the_entrys_optimizer():
    from learnbench.algorithms.backprop import DEFAULT_LR, Backprop
    from learnbench.algorithms.kolen_pollack import KolenPollack
    from learnbench.search_space import space_for

    declared = Backprop.search_space["lr"]
    assert space_for(Backprop, {"optimizer": "adam"})["lr"] == declared  # the declared range is Adam's
    for optimizer in ("momentum", "rmsprop"):
        lr = space_for(KolenPollack, {"optimizer": optimizer, "decay": 0.1})["lr"]
        ratio = DEFAULT_LR[optimizer] / DEFAULT_LR["adam"]
        assert (lr.low, lr.high) == pytest.approx((declared.low * ratio, declared.high * ratio))
    assert "decay" in space_for(KolenPollack, {"optimizer": "momentum"})  # the rest of the space is kept


def test_kfac_entries_search_their_damping_too():
    from learnbench.algorithms.backprop import Backprop
    from learnbench.search_space import space_for

    kfac = space_for(Backprop, {"optimizer": "kfac"})
    assert kfac["damping"].low < Backprop.damping < kfac["damping"].high  # the default inside the range
    assert is_log(kfac["damping"]) and "lr" in kfac
    assert "damping" not in space_for(Backprop, {"optimizer": "adam"})
