"""Registry: entry-point discovery, plugin files, hyper-parameter resolution."""

import textwrap

import pytest

from learnbench.algorithms.backprop import Backprop
from learnbench.errors import UsageError
from learnbench.registry import discover, hparam_defaults, hparams_of, load_plugin_file, resolve_hparams

PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar
from learnbench.algorithms.backprop import Backprop

@dataclass(eq=False)
class Slow(Backprop):
    """Backprop with a smaller default learning rate."""
    name: ClassVar[str] = "slow-backprop"
    lr: float | None = 1e-4
'''


def test_builtins_register_through_entry_points():
    registry = discover()
    entry = registry.get("backprop")
    assert entry.cls is Backprop and entry.distribution == "learnbench" and entry.source == "entry-point"


def test_plugin_file_is_registered_with_its_hash(tmp_path):
    path = tmp_path / "slow.py"
    path.write_text(textwrap.dedent(PLUGIN))
    entry = discover([str(path)]).get("slow-backprop")
    assert entry.cls.__name__ == "Slow" and len(entry.sha256) == 64
    assert entry.provenance()["file"] == str(path.resolve())


def test_plugin_claiming_a_builtin_name_is_an_error(tmp_path):
    path = tmp_path / "dup.py"
    path.write_text(textwrap.dedent(PLUGIN).replace('"slow-backprop"', '"backprop"'))
    with pytest.raises(UsageError, match="two plugins claim"):
        discover([str(path)])


def test_plugin_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import not_a_module_anywhere\n")
    with pytest.raises(UsageError, match="failed to import"):
        load_plugin_file(path)


def test_hyperparameters_round_trip():
    trainer = Backprop(**resolve_hparams(Backprop, {"lr": 0.01, "betas": [0.8, 0.9]}, "test"))
    assert hparams_of(trainer)["lr"] == 0.01 and tuple(trainer.betas) == (0.8, 0.9)
    assert set(hparams_of(trainer)) == set(hparam_defaults(Backprop))


def test_plain_class_trainer_uses_init_signature():
    class Plain:
        name = "plain"

        def __init__(self, batch_size: int = 8, sigma: float = 0.1):
            self.batch_size, self.sigma = batch_size, sigma

        def setup(self, model, task, generator): ...
        def step(self, batch): ...
        def eval_model(self): ...

    assert hparam_defaults(Plain) == {"batch_size": 8, "sigma": 0.1}
    assert resolve_hparams(Plain, {"sigma": 1}, "t") == {"batch_size": 8, "sigma": 1}


@pytest.mark.parametrize("given,match", [({"lr": "x"}, "lr must be"), ({"amp": 1}, "amp must be"),
                                         ({"betas": [0.9]}, "betas must be"), ({"nope": 1}, "unknown")])
def test_wrong_types_are_named(given, match):
    with pytest.raises(UsageError, match=match):
        resolve_hparams(Backprop, given, "suite")
