"""The comparison unit of every table and test: a group, the trials of one problem (dataset x model) under one
budget. Trials under different budgets are never compared; within a group, only ranked labels get best marks,
targets, pairwise tests and profile entries.

A group is ranked when its budget is stated in exactly one cost currency (epochs = examples, time_s, flops) and no
`steps`: a step is a minibatch for one trainer and a whole generation for another, so a step budget buys different
work. A label is left unranked when the suite gave it its own budget on the problem (`unranked = true` in its
config); such trials are shown beside the others (accuracy table, curves) but never ranked or tested with them.

Targets (AlgoPerf style, per problem): fractions of the validation accuracy that the suite's reference algorithm
(config key `reference`: a label or an algorithm id) reaches at the end of its run, mean over its done seeds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from learnbench.trial import Budget, StoredTrial

from .data import ReportTrial, metric_values

Groups = dict[str, list[ReportTrial]]  # label -> trials of one group, seed order

VAL, TEST = "val/accuracy", "test/accuracy"  # validation drives every choice; the test set gives final numbers
TARGET_FRACTIONS = (0.90, 0.95, 0.99, 1.0)


@dataclass(frozen=True)
class Targets:
    """Per-group validation-accuracy targets: (fraction of the reference, absolute accuracy) pairs."""

    levels: tuple[tuple[float, float], ...]
    source: str  # where the 100% level comes from, for captions


@dataclass(frozen=True)
class Group:
    """One problem under one budget. `labels` holds every label shown; `ranked` the ones that may be compared."""

    dataset: str
    model: str  # the model label
    budget: Budget
    labels: Groups
    ranked: list[str]
    reference: str  # the suite's reference algorithm: a label or an algorithm id
    notes: list[str]  # one line per reason some or all labels are not ranked

    @property
    def budget_text(self) -> str:
        return budget_text(self.budget)

    @property
    def tag(self) -> str:
        """The budget for file names: `time_s-300`, `flops-1e12`."""
        return "-".join(f"{k}-{_number(v)}" for k, v in _limits(self.budget)) or "no-budget"

    @property
    def name(self) -> str:
        return f"{self.dataset} / {self.model} / {self.budget_text}"

    def ranked_labels(self) -> Groups:
        return {k: self.labels[k] for k in self.ranked}


def _limits(budget: Budget) -> list[tuple[str, float]]:
    """The limits that are set, as floats (300 and 300.0 read alike), in name order."""
    return sorted((k, float(v)) for k, v in budget.limits().items())


def budget_text(budget: Budget) -> str:
    """`time_s = 300`, `flops = 1e12`, `epochs = 20, time_s = 60`; `no budget` when none is recorded."""
    return ", ".join(f"{k} = {_number(v)}" for k, v in _limits(budget)) or "no budget"


def _number(v: float) -> str:
    """300 -> `300`, 1e12 -> `1e12` (not `1e+12`), 2.5e-05 -> `2.5e-5`."""
    return re.sub(r"e(-?)0*(\d)", r"e\1\2", f"{v:g}".replace("e+", "e"))


def _budget_note(budget: Budget) -> str | None:
    """Why a group's budget cannot rank its trials (None when it can)."""
    if budget.currency():
        return None
    text = budget_text(budget)
    if budget.steps is not None:
        return (f"Not ranked: the budget counts steps ({text}), and a step is a minibatch for one algorithm and a "
                "whole generation for another; the trials are shown side by side only.")
    if not budget.limits():
        return "Not ranked: the trials record no budget; they are shown side by side only."
    return (f"Not ranked: the budget sets several limits ({text}), not one currency, so trials may have stopped on "
            "different ones; they are shown side by side only.")


def group_trials(trials: Sequence[ReportTrial]) -> dict[tuple[str, str], list[Group]]:
    """{(dataset, model label): [Group per budget]}, problems and budgets in order of first appearance. Budgets
    compare as values, so one written with 300 and one with 300.0 are the same group."""
    found: dict[tuple[str, str, Budget], Groups] = {}
    for t in trials:
        found.setdefault((t.dataset, t.model_label, t.budget), {}).setdefault(t.label, []).append(t)
    out: dict[tuple[str, str], list[Group]] = {}
    for (dataset, model, budget), labels in found.items():
        for group in labels.values():
            group.sort(key=lambda t: t.seed)
        out.setdefault((dataset, model), []).append(_group(dataset, model, budget, labels))
    return out


def _group(dataset: str, model: str, budget: Budget, labels: Groups) -> Group:
    own = [k for k, g in labels.items() if any(t.unranked for t in g)]
    budget_note = _budget_note(budget)
    notes = [budget_note] if budget_note else []
    if own:
        notes.append(f"Not ranked: the suite gave {', '.join(own)} its own budget on this problem (unranked = "
                     "true); shown beside the others, never ranked or tested against them.")
    ranked = [] if budget_note else [k for k in labels if k not in own]
    first = next(t for g in labels.values() for t in g)  # a store older than `reference` reads the suite default
    return Group(dataset, model, budget, labels, ranked, first.reference, notes)


def all_groups(trials: Sequence[ReportTrial]) -> list[Group]:
    return [g for groups in group_trials(trials).values() for g in groups]


def reference_label(group: Group) -> str | None:
    """The ranked label equal to the reference, else the first ranked label whose algorithm id equals it."""
    if group.reference in group.ranked:
        return group.reference
    return next((k for k in group.ranked if any(t.algorithm == group.reference for t in group.labels[k])), None)


def mean_final(trials: Sequence[StoredTrial], metric: str = VAL) -> float:
    """Mean of a final metric over the done trials; NaN when none has it."""
    values = metric_values(trials, metric)
    return float(values.mean()) if values.size else math.nan


def targets(group: Group) -> Targets:
    """TARGET_FRACTIONS of the reference's mean final validation accuracy; without a reference in the group, of the
    best ranked label's. Empty when no ranked label has a final validation accuracy."""
    ref = reference_label(group)
    if ref is not None and math.isfinite(mean_final(group.labels[ref])):
        base, n = mean_final(group.labels[ref]), len(metric_values(group.labels[ref], VAL))
        source = (f"the final validation accuracy of the reference {ref} (suite reference {group.reference!r}), "
                  f"mean over its {n} done seed(s): {100 * base:.2f}%")
    else:
        means = {k: mean_final(group.labels[k]) for k in group.ranked}
        means = {k: v for k, v in means.items() if math.isfinite(v)}
        if not means:
            return Targets((), "no ranked algorithm recorded a final validation accuracy")
        best = max(means, key=means.get)
        base = means[best]
        source = (f"the best mean final validation accuracy among ranked algorithms, {best}'s {100 * base:.2f}%, "
                  f"since the suite's reference {group.reference!r} has no ranked trial with a final validation "
                  "accuracy in this group")
    return Targets(tuple((f, f * base) for f in TARGET_FRACTIONS), source)
