"""Trial identity covers the code that runs: editing a helper module changes the ids of exactly the trials whose
trainer imports it (directly or through another learnbench module), and no other."""

import shutil
import sys

import pytest

from learnbench import config
from learnbench.identity import code_digests
from learnbench.registry import discover

REGISTRY = discover()
SUITE = {"name": "t", "datasets": ["digits"], "seeds": 1, "models": [{"kind": "mlp", "hidden": [16]}],
         "budget": {"steps": 5}, "robustness": {"examples": 0},
         "algorithms": [{"id": name} for name in ("backprop", "fa", "dfa", "sign-symmetry", "kolen-pollack",
                                                  "openai-es", "snes", "cma-es", "ga")]}
POPULATION = {"openai-es", "snes", "cma-es", "ga"}
FEEDBACK = {"fa", "dfa", "sign-symmetry", "kolen-pollack"}


def ids() -> dict[str, str]:
    return {t.label: t.id for t in config.resolve(config.apply_overrides(SUITE), REGISTRY, "cpu", "test")}


@pytest.mark.parametrize("module,dependents", [
    ("learnbench.population", POPULATION),  # imported by every population trainer
    ("learnbench.noise", POPULATION),  # imported by openai-es and snes, and by population.py
    ("learnbench.models", POPULATION),  # imported by population_engines.py, not by any gradient trainer
    ("learnbench.algorithms.feedback_layers", FEEDBACK),
    ("learnbench.algorithms.backprop", FEEDBACK | {"backprop"}),  # the FA family's class chain
    ("learnbench.algorithms.cma_es", {"cma-es"}),
])
def test_editing_a_copy_of_a_module_changes_exactly_the_dependent_ids(module, dependents, tmp_path, monkeypatch):
    before = ids()
    original = sys.modules[module].__file__
    copy = tmp_path / "edited.py"
    shutil.copyfile(original, copy)
    monkeypatch.setattr(sys.modules[module], "__file__", str(copy))
    assert ids() == before  # an identical copy is the same code
    copy.write_text(copy.read_text() + "\n# an edit\n")
    after = ids()
    changed = {label for label in before if after[label] != before[label]}
    assert changed == dependents


def test_the_digests_name_the_class_chain_and_transitive_imports():
    fa = code_digests(REGISTRY.get("kolen-pollack").cls)
    assert {"learnbench.algorithms.kolen_pollack", "learnbench.algorithms.feedback_training",
            "learnbench.algorithms.feedback_layers", "learnbench.algorithms.backprop", "learnbench.spec"} <= set(fa)
    es = code_digests(REGISTRY.get("openai-es").cls)
    assert {"learnbench.algorithms.openai_es", "learnbench.population", "learnbench.population_engines",
            "learnbench.population_backend", "learnbench.noise", "learnbench.models"} <= set(es)
    assert "learnbench.runner" not in es and "learnbench.algorithms.backprop" not in es


def test_a_plugin_file_is_hashed_with_the_learnbench_modules_it_imports(tmp_path):
    plugin = tmp_path / "my_rule.py"
    plugin.write_text("from learnbench.algorithms.backprop import Backprop\n\n"
                      "class MyRule(Backprop):\n    name = 'my-rule'\n")
    entry = discover([plugin]).get("my-rule")
    digests = code_digests(entry.cls)
    assert "learnbench.algorithms.backprop" in digests and len(digests) >= 3
    first = config.resolve(config.apply_overrides({**SUITE, "algorithms": [{"id": "my-rule"}]}),
                           discover([plugin]), "cpu", "test")[0].id
    plugin.write_text(plugin.read_text() + "# edited\n")
    second = config.resolve(config.apply_overrides({**SUITE, "algorithms": [{"id": "my-rule"}]}),
                            discover([plugin]), "cpu", "test")[0].id
    assert first != second
