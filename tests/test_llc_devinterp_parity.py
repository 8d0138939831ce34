"""Parity with the reference implementation: devinterp 2.0.1 ``devinterp.slt.llc.llc`` and
``lp.estimate_llc`` run the same sampler on the same model and data and must agree within Monte-Carlo
error (docs/concepts/llc.md)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import lightning_patterning as lp
from tests.conftest import Regression

LR = 2e-2
CHAINS = 8
DRAWS = 300
BATCH = 32


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny models: intra-op threads only add synchronization cost. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _devinterp_llc(regression: Regression, nbeta: float, output_path: str) -> tuple[float, float]:
    """devinterp's LLC mean and its standard error over chains."""
    from datasets import Dataset
    from devinterp.slt.llc import llc

    # devinterp wants token sequences: an index dataset whose first token is the row of (x, y).
    index = Dataset.from_dict({"input_ids": [[i, 0] for i in range(regression.n)]}).with_format("torch")

    def loss_fn(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        rows = input_ids[:, 0].long()
        return (model(regression.x[rows]).squeeze(-1) - regression.y[rows]).square().unsqueeze(1)

    # devinterp reseeds the global torch, numpy and random generators: keep them out of the test run.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng():
            out = llc(
                regression.model(),
                index,
                {},
                lr=LR,
                n_beta=nbeta,
                loss_fn=loss_fn,
                num_chains=CHAINS,
                num_draws=DRAWS,
                num_burnin_steps=0,  # devinterp averages over every step, burn-in included
                batch_size=BATCH,
                num_init_loss_batches=32,
                localization=0.0,
                # Independent minibatch streams per chain (the default shares one across chains, which
                # correlates the chains and makes their spread understate the error).
                match_sampling_input_ids_across_chains=False,
                device="cpu",
                output_path=output_path,
            )
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    mean = float(out.llc_mean)
    std = float(out.llc_std)  # ddof = 0
    stderr = std * math.sqrt(CHAINS / (CHAINS - 1)) / math.sqrt(CHAINS)
    return mean, stderr


def test_llc_agrees_with_devinterp(regression: Regression, loss_fn, tmp_path) -> None:
    from devinterp.utils import default_nbeta

    nbeta = default_nbeta(BATCH)
    reference, reference_stderr = _devinterp_llc(regression, nbeta, str(tmp_path / "samples.zarr"))

    results = {}
    for paired in (False, True):
        config = lp.SGLDConfig(
            lr=LR,
            nbeta=nbeta,
            localization=0.0,
            num_chains=CHAINS,
            num_burnin_steps=0,
            num_draws=DRAWS,
            batch_size=BATCH,
            paired=paired,
            init_loss_batches=32,
            seed=0,
        )
        results[paired] = lp.estimate_llc(regression.model(), loss_fn, regression.dataset, config)

    print(f"\ndevinterp: LLC {reference:.3f} ± {reference_stderr:.3f}")
    for paired, result in results.items():
        z = (result.mean - reference) / math.hypot(result.stderr, reference_stderr)
        print(f"ours (paired={paired}): LLC {result.mean:.3f} ± {result.stderr:.3f}  (z = {z:+.2f})")
    for paired, result in results.items():
        assert result.diverged_chains == 0
        assert result.nbeta == pytest.approx(nbeta)
        combined = math.hypot(result.stderr, reference_stderr)
        assert abs(result.mean - reference) < 2 * combined, paired
    # Both implementations sample the same tempered posterior; at lr 2e-2 the SGLD step inflates the
    # LLC of this quadratic by ≈ 1/(1 − ε·2nβ/4) ≈ 1.10, so neither should be far from 5.5 · 1.1.
    assert 5.5 < reference < 7.0
