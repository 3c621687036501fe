"""The static check CI runs with the test suite: every source file compiles and pyflakes finds nothing (an unused
or broken import, an undefined name), and code outside bench/ imports learnbench by its absolute name.

bench/ is installed as `learnbench`, and algorithms/, datasets/, reports/ as its subpackages (pyproject's
package-dir), so a relative `from ..errors import` in datasets/ reaches bench/errors.py only through that mapping;
`from learnbench.errors import` says where it goes."""

from __future__ import annotations

import ast
import compileall
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["bench", "algorithms", "datasets", "reports"]
OUTSIDE_BENCH = ["algorithms", "datasets", "reports", "examples"]


def test_every_source_file_compiles():
    for folder in SOURCES:
        assert compileall.compile_dir(ROOT / folder, quiet=1, force=True, legacy=False), folder


def test_pyflakes_finds_nothing():
    pytest.importorskip("pyflakes")
    folders = [str(ROOT / f) for f in [*SOURCES, "tests", "examples"]]
    result = subprocess.run([sys.executable, "-m", "pyflakes", *folders], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("folder", OUTSIDE_BENCH)
def test_code_outside_bench_imports_learnbench_absolutely(folder):
    crossing = []
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 1:  # `from ..x import`: leaves the folder
                crossing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert crossing == []
