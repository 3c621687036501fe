"""The plugin's own tests: learnbench's conformance kit (one pytest test per check), and the accept-if-better rule
against a direct computation."""

import torch
import torch.nn.functional as F

from learnbench import Batch, TaskInfo
from learnbench.testing import parametrize_with_checks
from learnbench_random_search import RandomSearch


@parametrize_with_checks([RandomSearch])
def test_learnbench_conformance(trainer, check):
    check(trainer)


def test_a_step_keeps_the_candidate_only_if_its_batch_loss_is_lower():
    torch.manual_seed(0)  # the test's own model initialisation; the trainer draws only from its generator
    model = torch.nn.Linear(4, 3)
    batch = Batch(torch.rand(16, 4), torch.randint(0, 3, (16,)))
    start = [p.detach().clone() for p in model.parameters()]
    trainer = RandomSearch(batch_size=16, sigma=0.5)
    trainer.setup(model, TaskInfo((4,), 3, 16, torch.device("cpu")), torch.Generator().manual_seed(1))
    before = F.cross_entropy(model(batch.x), batch.y).item()
    # the same perturbation the trainer draws: one normal per weight, in parameters() order
    noise = torch.randn(sum(p.numel() for p in start), generator=torch.Generator().manual_seed(1))
    candidate = torch.nn.Linear(4, 3)
    torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(start) + 0.5 * noise,
                                        candidate.parameters())
    after_candidate = F.cross_entropy(candidate(batch.x), batch.y).item()
    stats = trainer.step(batch)
    kept = [p.detach() for p in model.parameters()]
    expected = list(candidate.parameters()) if after_candidate < before else start
    assert all(torch.allclose(k, e) for k, e in zip(kept, expected))
    assert abs(float(stats.loss) - min(before, after_candidate)) < 1e-6
    assert stats.forward_passes == 32 and stats.backward_passes == 0
