"""SGLDConfig: validation of every argument, with errors that name the argument."""

from __future__ import annotations

import math

import pytest

import lightning_patterning as lp
from lightning_patterning.sgld.config import default_nbeta


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"nbeta": 0.0}, "nbeta"),
        ({"nbeta": -1.0}, "nbeta"),
        ({"nbeta": math.inf}, "nbeta"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"num_chains": 0}, "num_chains"),
        ({"num_chains": -1}, "num_chains"),
        ({"num_draws": 0}, "num_draws"),
        ({"num_burnin_steps": -1}, "num_burnin_steps"),
        ({"steps_between_draws": 0}, "steps_between_draws"),
        ({"batch_size": 0}, "batch_size"),
        ({"localization": -1.0}, "localization"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"init_loss_batches": 0}, "init_loss_batches"),
        ({"divergence_factor": 1.0}, "divergence_factor"),
        ({"divergence_floor": 0.0}, "divergence_floor"),
        ({"method": "foo"}, "method"),
        ({"chain_mode": "foo"}, "chain_mode"),
        ({"auto_sequential_flops": 0.0}, "auto_sequential_flops"),
        ({"auto_sequential_flops": -1e9}, "auto_sequential_flops"),
        ({"auto_sequential_flops": math.inf}, "auto_sequential_flops"),
        ({"rmsprop_alpha": 1.0}, "rmsprop_alpha"),
        ({"rmsprop_eps": 0.0}, "rmsprop_eps"),
    ],
)
def test_invalid_value_raises_value_error_naming_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        lp.SGLDConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_chains": 2.5}, "num_chains"),
        ({"num_draws": 10.0}, "num_draws"),
        ({"batch_size": "32"}, "batch_size"),
        ({"num_chains": True}, "num_chains"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_wrong_type_raises_type_error_naming_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(TypeError, match=name):
        lp.SGLDConfig(**kwargs)


def test_default_nbeta_is_m_over_log_m() -> None:
    config = lp.SGLDConfig(nbeta=None, batch_size=32)
    assert config.resolved_nbeta == pytest.approx(32 / math.log(32))
    assert default_nbeta(256) == pytest.approx(256 / math.log(256))
    assert lp.SGLDConfig(nbeta=7.0).resolved_nbeta == 7.0


def test_nbeta_none_needs_batch_of_two() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        lp.SGLDConfig(nbeta=None, batch_size=1)


def test_num_steps_counts_burnin_and_thinning() -> None:
    config = lp.SGLDConfig(num_burnin_steps=7, num_draws=5, steps_between_draws=3)
    assert config.num_steps == 7 + 5 * 3


def test_config_is_frozen_and_serializable() -> None:
    config = lp.SGLDConfig(lr=2e-3, num_chains=3)
    with pytest.raises(AttributeError):
        config.lr = 1.0  # type: ignore[misc]
    as_dict = config.to_dict()
    assert as_dict["lr"] == 2e-3 and as_dict["num_chains"] == 3
    assert lp.SGLDConfig(**as_dict) == config
