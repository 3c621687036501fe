"""`learnbench new-algorithm NAME`: a one-file trainer to start from.

The template is a real module, `learnbench.trainer_template` (bench/trainer_template.py): plain minibatch
stochastic gradient descent (Robbins & Monro 1951) on the cross-entropy loss, linted and run through the
conformance kit by the tests. `render` copies its source with the placeholder names (`my-algorithm`,
`my_algorithm.py`, `MyAlgorithm`, `My Algorithm`) replaced by the new algorithm's; the author then replaces the
update rule in `step` and the hyper-parameters with their own, keeping the contract the comments spell out.
"""

from __future__ import annotations

import re
from importlib import resources

from .errors import UsageError

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
# The template's own names, replaced by the new algorithm's (the file name first: it contains the id's words).
PLACEHOLDER_NAME, PLACEHOLDER_FILE = "my-algorithm", "my_algorithm.py"
PLACEHOLDER_CLASS, PLACEHOLDER_TITLE = "MyAlgorithm", "My Algorithm"


def class_name(name: str) -> str:
    """`my-rule` -> `MyRule`."""
    return "".join(part.capitalize() for part in re.split(r"[-_]", name))


def file_name(name: str) -> str:
    """`my-rule` -> `my_rule.py`: an importable module name."""
    return name.replace("-", "_") + ".py"


def render(name: str, file: str | None = None) -> str:
    """The template's text for algorithm id `name` (written to `file`, named in the docstring's commands)."""
    if not NAME_PATTERN.match(name):
        raise UsageError(f"algorithm name {name!r} must be lower-case letters and digits, words joined by - or _ "
                         "(e.g. my-rule)")
    title = " ".join(part.capitalize() for part in re.split(r"[-_]", name))
    text = resources.files("learnbench").joinpath("trainer_template.py").read_text(encoding="utf-8")
    for placeholder, value in ((PLACEHOLDER_FILE, file or file_name(name)), (PLACEHOLDER_CLASS, class_name(name)),
                               (PLACEHOLDER_TITLE, title), (PLACEHOLDER_NAME, name)):
        text = text.replace(placeholder, value)
    return text
