"""Configuration of a localized SGLD run (docs/concepts/llc.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

SamplingMethod = Literal["sgld", "rmsprop_sgld"]
ChainMode = Literal["auto", "vmap", "sequential"]

_METHODS = ("sgld", "rmsprop_sgld")
_CHAIN_MODES = ("auto", "vmap", "sequential")


def default_nbeta(batch_size: int) -> float:
    """devinterp's default inverse temperature ``nβ = m / log m`` for minibatch size ``m``."""
    if batch_size <= 1:
        raise ValueError(f"default nbeta needs batch_size >= 2, got {batch_size}")
    return batch_size / math.log(batch_size)


@dataclass(frozen=True)
class SGLDConfig:
    """Hyperparameters of localized SGLD at a checkpoint ``w*``.

    The chains sample the localized tempered posterior
    ``p(w) ∝ exp(−nβ·L_n(w) − (γ/2)·‖w − w*‖²)`` with devinterp's ``SGMCMC`` update
    ``w ← w − (ε/2)·mask·(nβ·∇L_B(w) + γ·(w − w*) + λ_wd·w) + √ε·mask·N(0, I)``
    (Lau et al. 2023, arXiv 2308.12108; devinterp 2.0.1 ``SGMCMC.sgld``).

    Args:
        lr: step size ε (> 0).
        nbeta: inverse temperature times n (> 0); ``None`` uses devinterp's
            ``default_nbeta(batch_size) = m / log m``.
        localization: γ, strength of the pull toward ``w*`` (≥ 0).
        num_chains: independent chains, each started at ``w*`` (≥ 1).
        num_draws: draws kept per chain (≥ 1).
        num_burnin_steps: steps discarded before the first draw (≥ 0).
        steps_between_draws: thinning; one draw every this many steps (≥ 1).
        batch_size: minibatch size of each SGLD step, per chain (≥ 1).
        method: ``"sgld"`` or ``"rmsprop_sgld"`` (preconditioned).
        seed: seed of the private generators (minibatches and noise); the global RNG is never used.
        weight_decay: λ_wd, a Gaussian prior centred at 0 (≥ 0, usually 0).
        paired: estimate the LLC as ``nβ·mean_t[L_{B_t}(w_t) − L_{B_t}(w*)]`` (one extra forward per
            draw, lower variance) instead of ``nβ·(mean_t L_{B_t}(w_t) − L(w*))``.
        shared_batches: every chain sees the same minibatch at each step (one stream seeded by
            ``(seed, run)``; devinterp 2.0.1's default ``match_sampling_input_ids_across_chains=True``).
            The paired estimator's ``L_{B_t}(w*)`` is then one forward per draw instead of one per
            chain; chains stay independent in their noise but share the minibatch noise, so with
            ``paired=False`` the chain-to-chain spread understates the error. ``False``: each chain has
            its own stream seeded by ``(seed, run, chain)``.
        init_loss_batches: minibatches averaged for ``L(w*)`` in the unpaired estimator (devinterp: 32).
        divergence_factor: a chain is *diverged* when its minibatch loss is non-finite or exceeds
            ``divergence_factor × max(L(w*), divergence_floor)`` (> 1).
        divergence_floor: floor on the reference loss of the divergence check (> 0), so that a
            checkpoint with near-zero loss does not flag every healthy chain.
        chain_mode: ``"vmap"`` stacks all chains into one forward/backward
            (``torch.func.functional_call`` + ``vmap``); ``"sequential"`` runs them one after
            another; ``"auto"`` runs them sequentially on CPU when one chain's forward is large (see
            ``auto_sequential_flops``), and otherwise tries ``vmap`` and falls back when the module
            cannot be vmapped.
        auto_sequential_flops: in ``"auto"`` mode on CPU, run the chains sequentially when one chain's
            forward on a minibatch takes at least this many FLOPs (matmul, convolution and attention
            FLOPs counted by ``torch.utils.flop_counter`` on the validation minibatch). Such a step is
            compute bound: stacking the chains gains nothing (one step at batch C·B costs what C steps
            at B do) and vmap's batched kernels cost ~5–10 % more (docs/benchmarks.md). ``None``: always
            try vmap. The default, 1.5e9, lies between the measured crossover's two sides on a 2-core
            EPYC (a 0.5M-parameter LM at ~1 GFLOP ran faster with vmap, a 1M one at 2.1 GFLOP faster
            sequentially).
        rmsprop_alpha: RMSprop moving-average coefficient (``rmsprop_sgld`` only).
        rmsprop_eps: RMSprop stability constant (``rmsprop_sgld`` only).
    """

    lr: float = 1e-3
    nbeta: float | None = 30.0
    localization: float = 300.0
    num_chains: int = 4
    num_draws: int = 100
    num_burnin_steps: int = 0
    steps_between_draws: int = 1
    batch_size: int = 64
    method: SamplingMethod = "sgld"
    seed: int = 0
    weight_decay: float = 0.0
    paired: bool = True
    shared_batches: bool = False
    init_loss_batches: int = 32
    divergence_factor: float = 100.0
    divergence_floor: float = 1e-2
    chain_mode: ChainMode = "auto"
    auto_sequential_flops: float | None = 1.5e9
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 0.1

    def __post_init__(self) -> None:
        _check_positive("lr", self.lr)
        if self.nbeta is not None:
            _check_positive("nbeta", self.nbeta, hint=" or None for devinterp's default m / log m")
        _check_at_least("localization", self.localization, 0.0)
        _check_int_at_least("num_chains", self.num_chains, 1)
        _check_int_at_least("num_draws", self.num_draws, 1)
        _check_int_at_least("num_burnin_steps", self.num_burnin_steps, 0)
        _check_int_at_least("steps_between_draws", self.steps_between_draws, 1)
        _check_int_at_least("batch_size", self.batch_size, 1)
        _check_int_at_least("init_loss_batches", self.init_loss_batches, 1)
        _check_at_least("weight_decay", self.weight_decay, 0.0)
        _check_positive("divergence_floor", self.divergence_floor)
        if not (isinstance(self.divergence_factor, (int, float)) and self.divergence_factor > 1):
            raise ValueError(f"divergence_factor must be a number > 1, got {self.divergence_factor!r}")
        if not isinstance(self.shared_batches, bool):
            raise TypeError(f"shared_batches must be a bool, got {type(self.shared_batches).__name__}")
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        if self.chain_mode not in _CHAIN_MODES:
            raise ValueError(f"chain_mode must be one of {_CHAIN_MODES}, got {self.chain_mode!r}")
        if self.auto_sequential_flops is not None:
            _check_positive("auto_sequential_flops", self.auto_sequential_flops, hint=" or None")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.nbeta is None and self.batch_size < 2:
            raise ValueError("nbeta=None (devinterp default m / log m) needs batch_size >= 2")
        if not 0.0 <= self.rmsprop_alpha < 1.0:
            raise ValueError(f"rmsprop_alpha must be in [0, 1), got {self.rmsprop_alpha!r}")
        _check_positive("rmsprop_eps", self.rmsprop_eps)

    @property
    def resolved_nbeta(self) -> float:
        """nβ in use: ``nbeta`` or, when it is ``None``, ``default_nbeta(batch_size)``."""
        return float(self.nbeta) if self.nbeta is not None else default_nbeta(self.batch_size)

    @property
    def num_steps(self) -> int:
        """SGLD steps per chain: ``num_burnin_steps + num_draws × steps_between_draws``."""
        return self.num_burnin_steps + self.num_draws * self.steps_between_draws

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of the configuration (for logs and result metadata)."""
        return asdict(self)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive(name: str, value: object, hint: str = "") -> None:
    if not (_is_number(value) and value > 0):  # type: ignore[operator]
        raise ValueError(f"{name} must be a finite number > 0{hint}, got {value!r}")


def _check_at_least(name: str, value: object, low: float) -> None:
    if not (_is_number(value) and value >= low):  # type: ignore[operator]
        raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")


def _check_int_at_least(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
