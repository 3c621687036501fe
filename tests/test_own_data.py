"""Your own data and your own model (issue 22, items 4 and 5): a `.npz` dataset named by path in a suite, checked
before anything runs and hashed into the trial id; a `learnbench.datasets` entry point; a model factory beside the
suite file, checked before the run and hashed into the trial id."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from learnbench import config, datasets
from learnbench.errors import UsageError
from learnbench.registry import discover

pytestmark = pytest.mark.usefixtures("one_thread")

SUITE = """
name = "own"
datasets = ["{data}"]
seeds = 1
[[models]]
{model}
[budget]
steps = {steps}
[eval]
points = 2
[robustness]
{robustness}
[[algorithms]]
id = "backprop"
batch_size = 16
{extra}
"""
MLP = 'kind = "mlp"\nhidden = [8]'
FACTORY = 'kind = "factory"\nfactory = "my_model:build"'
NO_ATTACKS = "examples = 0"
MODEL_CODE = """
from torch import nn


def build(input_shape, n_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, n_classes))
"""


def arrays(n_train: int = 60, n_test: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    """Three classes of 1x6x6 images in [0, 1]: a bright row per class, plus noise."""
    rng = np.random.default_rng(seed)

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 3
        x = rng.uniform(0, 0.3, (n, 1, 6, 6)).astype(np.float32)
        x[np.arange(n), 0, 2 * y] = 0.9
        return x, y.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = part(n_train), part(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_suite(folder: Path, data: str = "my.npz", model: str = MLP, robustness: str = NO_ATTACKS,
                steps: int = 3, extra: str = "") -> Path:
    path = folder / "suite.toml"
    path.write_text(SUITE.format(data=data, model=model, robustness=robustness, steps=steps, extra=extra))
    return path


def resolve(suite: Path):
    raw, _ = config.load_suite(str(suite))
    return config.resolve(raw, discover(), "cpu", "test")


@pytest.mark.slow
def test_npz_dataset_trains_and_reports_with_robustness(tmp_path: Path) -> None:
    np.savez(tmp_path / "my.npz", **arrays())
    robustness = 'examples = 12\neps_linf = [0.1]\nattacks = ["fgsm", "pgd-linf"]\npgd_steps = 3'
    suite = write_suite(tmp_path, robustness=robustness, steps=4,
                        extra='[[algorithms]]\nid = "fa"\nbatch_size = 16')
    run_dir = tmp_path / "run"
    done = run_cli("run", str(suite), "--out", str(run_dir), "--device", "cpu", "--workers", "1", "--quiet",
                   cwd=tmp_path / "..")  # not the suite's folder: the path resolves from the suite file
    assert done.returncode == 0, done.stderr
    shown = json.loads(run_cli("show", str(run_dir), "--json").stdout)
    assert {t["algorithm"] for t in shown["trials"]} == {"backprop", "fa"}
    for trial in shown["trials"]:
        assert trial["status"] == "done" and trial["dataset"] == str(tmp_path / "my.npz")
        assert "test/accuracy" in trial["metrics"] and "robust/pgd-linf/0.1" in trial["metrics"]
    assert run_cli("report", str(run_dir)).returncode == 0
    assert (run_dir / "report.md").is_file()


def _drop(key: str):
    def edit(a: dict) -> None:
        del a[key]
    return edit


def _set(key: str, make):
    def edit(a: dict) -> None:
        a[key] = make(a[key])
    return edit


def _nan(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[0, 0, 0, 0] = np.nan
    return x


BROKEN = {
    "wrong shape": (_set("x_train", lambda x: x.reshape(len(x), 1, 1, 6, 6)), "shape"),
    "nan": (_set("x_train", _nan), "NaN"),
    "labels out of range": (_set("y_test", lambda y: y + 5), "never has"),
    "float labels": (_set("y_train", lambda y: y.astype(np.float32)), "integer class labels"),
    "missing key": (_drop("x_test"), "missing array(s) x_test"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_data_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    data = arrays()
    edit, message = BROKEN[case]
    edit(data)
    np.savez(tmp_path / "my.npz", **data)
    run_dir = tmp_path / "run"
    done = run_cli("run", str(write_suite(tmp_path)), "--out", str(run_dir), "--device", "cpu")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "my.npz" in lines[0], done.stderr
    assert not run_dir.exists()


def test_other_checks(tmp_path: Path) -> None:
    cases = {"negative": _set("y_train", lambda y: y - 1), "range": _set("x_test", lambda x: x * 255),
             "mismatch": _set("y_train", lambda y: y[:-1])}
    for name, edit in cases.items():
        data = arrays()
        edit(data)
        np.savez(tmp_path / f"{name}.npz", **data)
        with pytest.raises(UsageError):
            datasets.info(str(tmp_path / f"{name}.npz"))
    np.savez(tmp_path / "obj.npz", **{**arrays(), "y_test": np.array([1, "a"], dtype=object)})
    with pytest.raises(UsageError, match="pickle"):
        datasets.info(str(tmp_path / "obj.npz"))


def test_splits_and_carved_validation(tmp_path: Path) -> None:
    np.savez(tmp_path / "vec.npz", **{k: v.reshape(len(v), -1) if k.startswith("x") else v
                                      for k, v in arrays().items()})
    splits = datasets.load(str(tmp_path / "vec.npz"))
    assert splits.input_shape == (36,) and splits.n_classes == 3
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (54, 6, 24)
    given = {**arrays(), "x_val": arrays()["x_test"][:5], "y_val": arrays()["y_test"][:5]}
    np.savez(tmp_path / "val.npz", **given)
    assert len(datasets.load(str(tmp_path / "val.npz")).val_y) == 5


def test_data_hash_is_part_of_the_trial_id(tmp_path: Path) -> None:
    np.savez(tmp_path / "my.npz", **arrays(seed=0))
    suite = write_suite(tmp_path)
    first = [t.id for t in resolve(suite)]
    assert first == [t.id for t in resolve(suite)]
    np.savez(tmp_path / "my.npz", **arrays(seed=1))
    assert not set(first) & {t.id for t in resolve(suite)}


def test_robustness_needs_eps_for_own_data(tmp_path: Path) -> None:
    np.savez(tmp_path / "my.npz", **arrays())
    with pytest.raises(UsageError, match="robustness.eps_linf"):
        resolve(write_suite(tmp_path, robustness="examples = 10"))
    trials = resolve(write_suite(tmp_path, robustness="examples = 10\neps_linf = [0.1]"))
    assert trials[0].robustness["eps_linf"] == [0.1]


@pytest.mark.slow
def test_dataset_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    (site / "mydata_pkg-1.2.dist-info").mkdir(parents=True)
    (site / "mydata_pkg-1.2.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: mydata-pkg\n"
                                                                 "Version: 1.2\n")
    (site / "mydata_pkg-1.2.dist-info" / "entry_points.txt").write_text(
        "[learnbench.datasets]\nmy-data = mydata_pkg:load\nbroken-data = mydata_pkg:nothing_here\n")
    np.savez(tmp_path / "my.npz", **arrays())
    (site / "mydata_pkg.py").write_text(textwrap.dedent(f"""
        import numpy as np
        def load():
            with np.load({str(tmp_path / "my.npz")!r}) as f:
                return dict(f)
        """))
    listed = run_cli("list", "datasets", env={"PYTHONPATH": str(site)})
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("my-data"))
    assert "mydata-pkg" in row and "1.2" in row and "mydata_pkg:load" in row
    assert "BROKEN" in next(line for line in listed.stdout.splitlines() if line.startswith("broken-data"))
    assert "digits" in listed.stdout
    monkeypatch.syspath_prepend(str(site))
    info = datasets.info("my-data")
    assert info.input_shape == (1, 6, 6) and info.n_classes == 3
    trial = resolve(write_suite(tmp_path, data="my-data"))[0]
    assert trial.data["distribution"] == "mydata-pkg" and trial.data["version"] == "1.2"


@pytest.mark.slow
def test_model_factory_beside_the_suite(tmp_path: Path) -> None:
    np.savez(tmp_path / "my.npz", **arrays())
    (tmp_path / "my_model.py").write_text(MODEL_CODE)
    suite = write_suite(tmp_path, model=FACTORY, steps=2)
    run_dir, elsewhere = tmp_path / "run", tmp_path.parent  # run from another folder: found beside the suite
    first = run_cli("run", str(suite), "--out", str(run_dir), "--device", "cpu", "--workers", "1", "--quiet",
                    cwd=elsewhere)
    assert first.returncode == 0, first.stderr
    again = run_cli("run", str(suite), "--out", str(run_dir), "--device", "cpu", "--quiet", cwd=elsewhere)
    assert "(1 already finished)" in again.stderr, again.stderr
    ids = [t.id for t in resolve(suite)]
    (tmp_path / "my_model.py").write_text(MODEL_CODE.replace("nn.ReLU()", "nn.Tanh()"))
    assert not set(ids) & {t.id for t in resolve(suite)}
    edited = run_cli("run", str(suite), "--out", str(run_dir), "--device", "cpu", "--quiet", cwd=elsewhere)
    assert edited.returncode == 0 and "(0 already finished)" in edited.stderr, edited.stderr


@pytest.mark.slow
def test_broken_model_factory_exits_2_before_the_run(tmp_path: Path) -> None:
    np.savez(tmp_path / "my.npz", **arrays())
    (tmp_path / "my_model.py").write_text("import no_such_module_xyz\n" + MODEL_CODE)
    run_dir = tmp_path / "run"
    done = run_cli("run", str(write_suite(tmp_path, model=FACTORY)), "--out", str(run_dir), "--device", "cpu")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_module_xyz" in lines[0], done.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("code, message", [(MODEL_CODE.replace("def build", "def other"), "has no attribute"),
                                           (MODEL_CODE.replace("36", "99"), "failed for inputs"),
                                           (MODEL_CODE.replace("nn.Linear(8, n_classes)", "nn.Linear(8, 5)"), "expected \\[2, 3\\]")])
def test_model_factory_is_checked_for_the_dataset(tmp_path: Path, code: str, message: str) -> None:
    np.savez(tmp_path / "my.npz", **arrays())
    (tmp_path / "my_model.py").write_text(code)
    with pytest.raises(UsageError, match=message):
        resolve(write_suite(tmp_path, model=FACTORY))


# ---- a `module:function` returning torch Datasets (item 4) ----------------------------------------------------------

DATA_CODE = """
import numpy as np
import torch
from torch.utils.data import Dataset

ARRAYS = np.load({path!r})


class Rows(Dataset):
    # A map-style Dataset giving (x [1, 6, 6] tensor, y int) pairs, as a user's own class would.
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]), int(self.y[i])


def make():
    return {{"train": Rows(ARRAYS["x_train"], ARRAYS["y_train"]), "test": Rows(ARRAYS["x_test"], ARRAYS["y_test"])}}


def as_tensors():  # (train, val, test) TensorDatasets of uint8 pixels, taken whole
    pixels = lambda x: torch.from_numpy((x * 255).round().astype(np.uint8))
    y = lambda key: torch.from_numpy(ARRAYS[key])
    train = torch.utils.data.TensorDataset(pixels(ARRAYS["x_train"][6:]), y("y_train")[6:])
    val = torch.utils.data.TensorDataset(pixels(ARRAYS["x_train"][:6]), y("y_train")[:6])
    return train, val, torch.utils.data.TensorDataset(pixels(ARRAYS["x_test"]), y("y_test"))
"""


def write_data_module(folder: Path, name: str = "my_data.py", code: str = DATA_CODE) -> None:
    np.savez(folder / "source.npz", **arrays())
    (folder / name).write_text(code.format(path=str(folder / "source.npz")))


def test_dataset_factory_matches_the_same_arrays_as_npz(tmp_path: Path) -> None:
    """The factory's Datasets give exactly the splits the same arrays give as a `.npz` file (the reference)."""
    write_data_module(tmp_path)
    reference = datasets.load(str(tmp_path / "source.npz"))
    name = f"{tmp_path / 'my_data.py'}:make"
    assert datasets.is_factory(name) and not datasets.is_factory("mnist") and not datasets.is_factory("a.npz")
    splits = datasets.load(name)
    for part in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(splits, part), getattr(reference, part)), part
    tensors = datasets.load(f"{tmp_path / 'my_data.py'}:as_tensors")  # uint8 pixels / 255, the given val split
    assert tensors.input_shape == (1, 6, 6) and len(tensors.val_y) == 6 and len(tensors.train_y) == 54
    assert torch.allclose(tensors.test_x, reference.test_x, atol=0.5 / 255)


@pytest.mark.slow
def test_dataset_factory_beside_the_suite_trains_and_reports(tmp_path: Path) -> None:
    write_data_module(tmp_path)
    robustness = 'examples = 12\neps_linf = [0.1]\nattacks = ["fgsm"]'
    suite = write_suite(tmp_path, data="my_data:make", robustness=robustness, steps=3,
                        extra='[[algorithms]]\nid = "fa"\nbatch_size = 16')
    run_dir = tmp_path / "run"
    done = run_cli("run", str(suite), "--out", str(run_dir), "--device", "cpu", "--workers", "1", "--quiet",
                   cwd=tmp_path.parent)  # not the suite's folder: my_data.py resolves from the suite file
    assert done.returncode == 0, done.stderr
    shown = json.loads(run_cli("show", str(run_dir), "--json").stdout)
    assert {t["algorithm"] for t in shown["trials"]} == {"backprop", "fa"}
    for trial in shown["trials"]:
        assert trial["status"] == "done" and trial["dataset"] == f"{tmp_path / 'my_data.py'}:make"
        assert "robust/fgsm/0.1" in trial["metrics"]
    assert run_cli("report", str(run_dir)).returncode == 0
    # on the command line, `module:function` resolves from the current folder
    here = run_cli("run", "quick", "--algorithms", "backprop", "--datasets", "my_data:make", "--set",
                   "budget.steps=2", "--set", "robustness.examples=0", "--out", str(tmp_path / "cli"), "--device",
                   "cpu", "--quiet", cwd=tmp_path)
    assert here.returncode == 0, here.stderr


def test_dataset_factory_output_is_hashed_into_the_trial_id(tmp_path: Path) -> None:
    write_data_module(tmp_path)
    suite = write_suite(tmp_path, data="my_data:make")
    first = [t.id for t in resolve(suite)]
    assert first == [t.id for t in resolve(suite)]
    assert resolve(suite)[0].data["sha256"] == datasets.fingerprint(f"{tmp_path / 'my_data.py'}:make")["sha256"]
    code = (tmp_path / "my_data.py").read_text().replace('ARRAYS["x_test"], ARRAYS["y_test"]',
                                                         'ARRAYS["x_test"][:-1], ARRAYS["y_test"][:-1]')
    (tmp_path / "my_data.py").write_text(code)  # other data: new ids
    assert not set(first) & {t.id for t in resolve(suite)}


BROKEN_FACTORIES = {
    "import": ("import no_such_module_xyz\n", "no_such_module_xyz"),
    "raises": ("def make():\n    raise RuntimeError('disk gone')\n", "disk gone"),
    "returns": ("def make():\n    return [1]\n", "expected {'train'"),
    "keys": ("def make():\n    return {'train': [], 'valid': []}\n", "'train' and 'test'"),
    "items": ("def make():\n    return [(1, 2, 3)], [(1, 2, 3)]\n", "expected a pair (x, y)"),
    "shapes": ("import numpy as np\ndef make():\n    d = [(np.zeros(3), 0), (np.zeros(4), 1)]\n    return d, d\n",
               "different shapes"),
    "labels": ("import numpy as np\ndef make():\n    d = [(np.zeros(3), 0.5), (np.zeros(3), 1.0)]\n    return d, d\n",
               "one integer class label"),
    "range": ("import numpy as np\ndef make():\n    d = [(np.full(3, 7.0), 0), (np.zeros(3), 1)]\n    return d, d\n",
              "inputs must lie in [0, 1]"),
}


@pytest.mark.parametrize("case", list(BROKEN_FACTORIES))
def test_broken_dataset_factory_is_a_usage_error(tmp_path: Path, case: str) -> None:
    code, message = BROKEN_FACTORIES[case]
    (tmp_path / f"broken_{case}.py").write_text(code)
    with pytest.raises(UsageError, match=re.escape(message)):
        datasets.info(f"{tmp_path / f'broken_{case}.py'}:make")


@pytest.mark.slow
def test_broken_dataset_factory_exits_2_before_the_run(tmp_path: Path) -> None:
    (tmp_path / "my_data.py").write_text(BROKEN_FACTORIES["shapes"][0])
    run_dir = tmp_path / "run"
    done = run_cli("run", str(write_suite(tmp_path, data="my_data:make")), "--out", str(run_dir), "--device", "cpu")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "different shapes" in lines[0] and "my_data.py:make" in lines[0], done.stderr
    assert not run_dir.exists()
