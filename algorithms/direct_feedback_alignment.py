"""Direct feedback alignment (Nøkland 2016, "Direct Feedback Alignment Provides Learning in Deep Neural
Networks", NeurIPS 2016).

The output error e = dL/d(logits) [N, C] is sent straight to every hidden layer through a fixed random matrix:
the error reaching a layer's input is `e B` (B [C, input size]) instead of the backpropagated one, and autograd
multiplies it by the derivative of whatever lies between that input and the previous layer (activation, norm,
pooling). The output layer's update is the true one. No error travels layer to layer, so with one hidden layer DFA
is FA with the output layer's feedback matrix. Optimizer, schedule and step are the backprop trainer's.

The pseudo-gradient this model's backward produces at its input is `e B_0`: the output error projected into input
space by the first layer's random matrix (see `feedback_layers`). Evaluation and the real attacks use the plain
model; the output error is caught per backward pass, so nothing of training is reused at evaluation.

Defaults: backprop's Adam settings and B ~ N(0, 1/(C + input size)), the same rule as the fa trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from learnbench.algorithms.feedback_alignment import FeedbackAlignment


@dataclass(eq=False)
class DirectFeedbackAlignment(FeedbackAlignment):
    """Minibatch training with the output error projected to each layer by fixed random matrices (DFA)."""

    name: ClassVar[str] = "dfa"
    rule: ClassVar[str] = "dfa"
