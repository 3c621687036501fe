"""`learnbench perf fa`: the timing table covers every trainer, through the runner's loop, backprop as reference."""

from __future__ import annotations

import pytest
import torch

from learnbench.perf.fa import TRAINERS, time_epochs


pytestmark = pytest.mark.usefixtures("one_thread")


def test_perf_fa_times_every_trainer_against_backprop() -> None:
    from learnbench.datasets import Splits

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    data = Splits("tiny", x, y, x, y, x, y, (1, 28, 28), 10)
    rows = time_epochs(data, batch_size=16, repeats=1, device=torch.device("cpu"))
    assert [row[0] for row in rows] == [cls.name for cls in TRAINERS]
    assert rows[0][2] == pytest.approx(1.0) and all(row[1] > 0 and row[3] >= 0 for row in rows)
