"""Suites: resolution into trials, --set overrides, trial ids, and every validation error."""

import pytest

from learnbench import config
from learnbench.errors import UsageError
from learnbench.registry import discover
from learnbench.trial import Budget

REGISTRY = discover()


def resolve(suite, **overrides):
    return config.resolve(config.apply_overrides(suite, **overrides), REGISTRY, "cpu", "test")


def base_suite(**changes):
    suite = {"name": "t", "datasets": ["digits"], "seeds": 2, "models": [{"kind": "mlp", "hidden": [16]}],
             "budget": {"epochs": 2}, "robustness": {"examples": 0},
             "algorithms": [{"id": "backprop"}, {"id": "backprop", "label": "sgd", "optimizer": "sgd", "lr": 0.1}]}
    suite.update(changes)
    return suite


def test_trials_are_the_cross_product_with_stable_distinct_ids():
    trials = resolve(base_suite())
    assert len(trials) == 2 * 2  # 2 entries x 2 seeds
    assert len({t.id for t in trials}) == 4
    assert [t.id for t in resolve(base_suite())] == [t.id for t in trials]
    assert {t.label for t in trials} == {"backprop", "sgd"}
    sgd = next(t for t in trials if t.label == "sgd")
    assert sgd.hparams["optimizer"] == "sgd" and sgd.hparams["lr"] == 0.1
    assert sgd.hparams["batch_size"] == 128  # defaults are filled in, so the hash covers them


def test_set_overrides_budget_model_and_hyperparameters():
    trials = resolve(base_suite(), sets=["budget.epochs=5", "model.hidden=[32, 8]", "sgd.lr=0.5", "seeds=1"])
    assert {t.budget.epochs for t in trials} == {5}
    assert {t.model_label for t in trials} == {"mlp-32-8"}
    assert next(t for t in trials if t.label == "sgd").hparams["lr"] == 0.5
    assert len(trials) == 2
    cnn = resolve(base_suite(), sets=["model.kind=cnn"])
    assert {t.model["kind"] for t in cnn} == {"cnn"}


def test_set_by_algorithm_id_reaches_every_entry_of_it():
    trials = resolve(base_suite(), sets=["backprop.batch_size=64"])
    assert {t.hparams["batch_size"] for t in trials} == {64}


def test_algorithms_filter_and_seeds():
    trials = resolve(base_suite(), algorithms=["sgd"], seeds=3)
    assert {t.label for t in trials} == {"sgd"} and sorted(t.seed for t in trials) == [0, 1, 2]


def test_entries_restricted_to_datasets():
    suite = base_suite(datasets=["digits", "mnist1d"], seeds=1, algorithms=[
        {"id": "backprop"}, {"id": "backprop", "label": "sgd", "optimizer": "sgd", "datasets": ["mnist1d"]}])
    trials = resolve(suite)
    assert sorted((t.label, t.dataset) for t in trials) == [("backprop", "digits"), ("backprop", "mnist1d"),
                                                             ("sgd", "mnist1d")]
    with pytest.raises(UsageError, match="datasets"):
        resolve(base_suite(algorithms=[{"id": "backprop", "datasets": ["mnist1d"]}]))  # digits only: no trials


def test_horizon_filled_from_the_epoch_budget():
    trials = resolve(base_suite(algorithms=[{"id": "backprop", "schedule": "cosine", "batch_size": 100}]))
    from learnbench.datasets import info
    import math
    assert trials[0].hparams["horizon_steps"] == math.ceil(2 * info("digits").n_train / 100)


def test_trial_id_changes_with_any_setting():
    a = resolve(base_suite())[0]
    b = resolve(base_suite(), sets=["backprop.lr=0.002"])[0]
    c = resolve(base_suite(), sets=["budget.epochs=3"])[0]
    assert len({a.id, b.id, c.id}) == 3


def test_entry_level_budget_needs_unranked_and_model_filter():
    slow = {"id": "backprop", "label": "slow", "models": ["cnn"], "budget": {"steps": 7}}
    suite = base_suite(models=[{"kind": "mlp", "hidden": [16]}, {"kind": "cnn"}], algorithms=[{"id": "backprop"}, slow])
    with pytest.raises(UsageError, match="entry 'slow' sets its own budget steps = 7, unlike the problem's epochs = 2"
                                         ".*unranked = true"):
        resolve(suite)
    slow["unranked"] = True
    trials = resolve(suite)
    slow_trials = [t for t in trials if t.label == "slow"]
    assert {t.model_label for t in slow_trials} == {"cnn"} and slow_trials[0].budget.steps == 7
    assert all(t.unranked for t in slow_trials)
    assert not any(t.unranked for t in trials if t.label == "backprop")
    assert len([t for t in trials if t.label == "backprop"]) == 4
    slow["budget"] = {"epochs": 2}  # the problem's own budget, stated again: nothing to declare
    del slow["unranked"]
    assert resolve(suite)


def test_a_problem_budget_lives_on_the_model_and_the_command_line_replaces_every_budget():
    suite = base_suite(models=[{"kind": "mlp", "hidden": [16]}, {"kind": "cnn", "budget": {"time_s": 30}}])
    budgets = {t.model_label: t.budget for t in resolve(suite)}
    assert budgets["cnn"] == Budget(time_s=30)
    assert budgets["mlp-16x1"].epochs == 2
    assert {t.budget.flops for t in resolve(suite, sets=["budget.flops=1e9"])} == {1e9}
    assert {t.budget.time_s for t in resolve(suite, sets=["budget.flops=1e9"])} == {None}
    no_suite_budget = {k: v for k, v in suite.items() if k != "budget"}
    with pytest.raises(UsageError, match="model mlp-16x1 has no budget"):
        resolve(no_suite_budget)


def test_reference_is_a_suite_key_outside_the_trial_id():
    trials = resolve(base_suite())
    assert {t.reference for t in trials} == {"backprop"}
    other = resolve(base_suite(reference="sgd"))
    assert {t.reference for t in other} == {"sgd"}
    assert [t.id for t in other] == [t.id for t in trials]
    with pytest.raises(UsageError, match="reference must be"):
        resolve(base_suite(reference=3))


@pytest.mark.parametrize("suite,overrides,match", [
    (base_suite(budget={"epochs": -1}), {}, "positive number"),
    (base_suite(budget={"epochs": 0}), {}, "positive number"),
    (base_suite(budget={}), {}, "at least one"),
    (base_suite(budget={"epoch": 3}), {}, "budget: unknown key"),
    (base_suite(seeds=0), {}, "seeds"),
    (base_suite(seeds="three"), {}, "seeds"),
    (base_suite(datasets=["imagenet"]), {}, "unknown dataset"),
    (base_suite(models=[{"kind": "vit"}]), {}, "unknown model kind"),
    (base_suite(algorithms=[{"id": "hebbian"}]), {}, "unknown algorithm"),
    (base_suite(algorithms=[{"id": "backprop", "lrr": 1}]), {}, "unknown hyper-parameter"),
    (base_suite(algorithms=[{"id": "backprop", "lr": "fast"}]), {}, "lr must be"),
    (base_suite(algorithms=[{"id": "backprop", "batch_size": 3.5}]), {}, "batch_size must be"),
    (base_suite(algorithms=[]), {}, "at least one"),
    (base_suite(colour="blue"), {}, "unknown key"),
    (base_suite(), {"sets": ["budget.epochs=-3"]}, "positive number"),
    (base_suite(), {"sets": ["frobnicate=1"]}, "unknown --set key"),
    (base_suite(), {"sets": ["backprop.nope=1"]}, "unknown hyper-parameter"),
    (base_suite(), {"sets": ["noequals"]}, "key=value"),
    (base_suite(), {"seeds": 0}, "--seeds"),
    (base_suite(), {"algorithms": ["ga-not-here"]}, "nor installed"),
    (base_suite(eval={"points": -1}), {}, "non-negative integer"),
    (base_suite(diagnostics={"every": 5, "probes": ["telepathy"]}), {}, "unknown diagnostics probe"),
    (base_suite(algorithms=[{"id": "backprop", "unranked": "yes"}]), {}, "unranked must be true or false"),
    (base_suite(models=[{"kind": "mlp", "budget": {"hours": 1}}]), {}, "budget: unknown key"),
])
def test_bad_suites_are_usage_errors(suite, overrides, match):
    with pytest.raises(UsageError, match=match):
        resolve(suite, **overrides)


def test_set_values_parse_as_toml():
    assert config.parse_value("1e12") == 1e12
    assert config.parse_value("[32, 16]") == [32, 16]
    assert config.parse_value("true") is True
    assert config.parse_value("sgd") == "sgd"
    assert config.parse_value('"quoted"') == "quoted"


def test_builtin_suites_all_resolve():
    for name in config.builtin_suites():
        raw, _ = config.load_suite(name)
        assert resolve(raw), name


def test_malformed_toml_and_unknown_suite(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    with pytest.raises(UsageError, match="malformed TOML"):
        config.load_suite(str(bad))
    with pytest.raises(UsageError, match="unknown suite"):
        config.load_suite("no-such-suite")


def test_algorithms_flag_adds_an_installed_algorithm_the_suite_lacks():
    trials = resolve(base_suite(), algorithms=["sgd", "fa"], registry=REGISTRY)
    assert {t.label for t in trials} == {"sgd", "fa"}
    fa = next(t for t in trials if t.label == "fa")
    assert fa.hparams["batch_size"] == 128  # the trainer's own defaults


def test_supported_models_may_depend_on_the_hyper_parameters():
    """forward-gradient's `supported_models` is a property: activity perturbation (mlp/resmlp only) paired with the
    cnn is a usage error before anything runs; weight perturbation on the cnn resolves."""
    from helpers import make_trials

    cnn = {"models": [{"kind": "cnn"}]}
    with pytest.raises(UsageError, match=r"forward-gradient trains 'mlp', 'resmlp' models only, not cnn"):
        make_trials({**cnn, "algorithms": [{"id": "forward-gradient", "perturb": "activations"}]})
    trials = make_trials({**cnn, "algorithms": [{"id": "forward-gradient", "perturb": "weights"}]})
    assert [t.hparams["perturb"] for t in trials] == ["weights"]


def test_a_trainer_declaring_its_models_refuses_others_before_anything_runs(tmp_path):
    """`supported_models`: an mlp-only trainer paired with the cnn is one usage error naming both; on mlp it runs."""
    import textwrap

    from helpers import make_trials

    plugin = tmp_path / "mlp_only.py"
    plugin.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from typing import ClassVar
        from learnbench.algorithms.backprop import Backprop

        @dataclass(eq=False)
        class MlpOnly(Backprop):
            name: ClassVar[str] = "mlp-only"
            supported_models: ClassVar[tuple[str, ...]] = ("mlp", "resmlp")
    '''))
    algorithms = [{"id": "mlp-only", "batch_size": 32}]
    assert make_trials({"algorithms": algorithms}, [plugin])
    with pytest.raises(UsageError, match=r"mlp-only trains 'mlp', 'resmlp' models only, not cnn \(kind 'cnn'\)"):
        make_trials({"algorithms": algorithms, "models": [{"kind": "mlp", "hidden": [16]}, {"kind": "cnn"}]},
                    [plugin])
