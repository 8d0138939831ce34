"""Shared fixtures: linear regression at its least-squares solution, whose LLC is known exactly.

With per-sample squared error the loss is an exact quadratic in (weight, bias), so at the least-squares
solution the localized tempered posterior (localization 0) is Gaussian and, for any nβ,
``E[nβ·(L(w) − L(w*))] = (number of sampled parameters) / 2``: 5.5 for all 11 parameters, 5.0 for the
10 weights, 0.5 for the bias (docs/concepts/llc.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset


@dataclass
class Regression:
    """A linear-regression problem and an ``nn.Linear`` set to its least-squares solution."""

    x: torch.Tensor  # [n, d]
    y: torch.Tensor  # [n]
    weight: torch.Tensor  # [1, d] least-squares weights
    bias: torch.Tensor  # [1] least-squares bias
    dataset: TensorDataset

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def d(self) -> int:
        return self.x.shape[1]

    def model(self) -> nn.Linear:
        """A fresh ``nn.Linear(d, 1)`` at the least-squares solution."""
        model = nn.Linear(self.d, 1)
        with torch.no_grad():
            model.weight.copy_(self.weight)
            model.bias.copy_(self.bias)
        return model


def make_regression(n: int = 2000, d: int = 10, noise: float = 0.3, seed: int = 0) -> Regression:
    """``y = x·w_true + b_true + noise·ε`` with ``x ~ N(0, I)``; fit by least squares (float64)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    w_true = torch.randn(d, generator=generator)
    b_true = torch.randn((), generator=generator)
    y = x @ w_true + b_true + noise * torch.randn(n, generator=generator)
    design = torch.cat([x, torch.ones(n, 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, y.double().unsqueeze(1)).solution.squeeze(1)
    weight = solution[:d].float().unsqueeze(0)
    bias = solution[d:].float()
    return Regression(x=x, y=y, weight=weight, bias=bias, dataset=TensorDataset(x, y))


def squared_error(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-sample squared error ``(f(x) − y)²``, shape ``[B]``."""
    x, y = batch
    return (module(x).squeeze(-1) - y).square()


@pytest.fixture(scope="session")
def regression() -> Regression:
    """n = 2000, d = 10 (+ bias), noise std 0.3."""
    return make_regression()


@pytest.fixture
def regression_model(regression: Regression) -> nn.Linear:
    """A fresh ``nn.Linear(10, 1)`` at the least-squares solution of ``regression``."""
    return regression.model()


@pytest.fixture
def loss_fn() -> Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per-sample squared error, ``loss_fn(module, (x, y)) -> Tensor[B]``."""
    return squared_error


@pytest.fixture(scope="session")
def regression_factory() -> Callable[..., Regression]:
    """``regression_factory(n=2000, d=10, noise=0.3, seed=0)``: another regression problem."""
    return make_regression
