"""Cases for luoshu/ops/random.py: the same draws as torch with an equally seeded generator."""

import torch

import luoshu as ls
from tests.ops.harness import OpCase, Positive

O = ls.ops

CASES = [
    OpCase("uniform", lambda: O.uniform((3, 4)), lambda g: torch.rand(3, 4, generator=g), grad=False, seed=1),
    OpCase("uniform_range", lambda: O.uniform(5, -2.0, 3.0, dtype="float64"),
           lambda g: torch.empty(5, dtype=torch.float64).uniform_(-2.0, 3.0, generator=g), grad=False, seed=2),
    OpCase("normal", lambda: O.normal((3, 4)), lambda g: torch.randn(3, 4, generator=g), grad=False, seed=3),
    OpCase("normal_mean_std", lambda: O.normal((2, 5), 1.0, 2.0),
           lambda g: torch.normal(1.0, 2.0, (2, 5), generator=g), grad=False, seed=4),
    OpCase("bernoulli_probs", O.bernoulli, lambda p, g: torch.bernoulli(p, generator=g),
           [Positive((4, 5), 0.0, 1.0)], grad=False, seed=5),
    OpCase("bernoulli_shape", lambda: O.bernoulli(0.3, (3, 4)),
           lambda g: torch.empty(3, 4).bernoulli_(0.3, generator=g), grad=False, seed=6),
    OpCase("randint", lambda: O.randint(-3, 10, (4, 2)), lambda g: torch.randint(-3, 10, (4, 2), generator=g),
           grad=False, seed=7),
    OpCase("randint_high_only", lambda: O.randint(5, shape=6), lambda g: torch.randint(5, (6,), generator=g),
           grad=False, seed=8),
    OpCase("randperm", lambda: O.randperm(9), lambda g: torch.randperm(9, generator=g), grad=False, seed=9),
    OpCase("uniform_like", O.uniform_like, lambda x, g: torch.rand(x.shape, generator=g, dtype=x.dtype),
           [(3, 4)], grad=False, seed=10),
    OpCase("normal_like", lambda x: O.normal_like(x, 0.5, 3.0),
           lambda x, g: torch.empty_like(x).normal_(0.5, 3.0, generator=g), [(3, 4)], grad=False, seed=11),
    OpCase("dropout_mask", lambda x: x * O.bernoulli(O.full_like(x, 0.7)) / 0.7,
           lambda x, g: x * torch.bernoulli(torch.full_like(x, 0.7), generator=g) / 0.7, [(4, 6)], seed=12),
]
