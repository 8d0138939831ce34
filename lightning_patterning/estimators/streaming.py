"""Running sums of the draws, per chain, and the susceptibility formulas applied to them.

Per chain the unrestricted run keeps ``n, ΣL, Σℓ_z, Σφ, Σφ·L, Σφ·ℓ_z`` and each restricted run
``n, Σg, Σg·L, Σg·ℓ_z`` (g = L − L(w*)): O(k·N) memory whatever the number of draws (``N`` columns:
probe samples, or ``N·T`` tokens for per-position losses, ``estimators.columns``). Sums are placed in
global ``[num_chains, ...]`` tensors and summed over processes with one all-reduce, so every rank computes
the same matrix.
"""

from __future__ import annotations

import math

import torch

from lightning_patterning.estimators.columns import ProbeColumns
from lightning_patterning.estimators.llc import AllReduce, _reduce_device
from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.observables import Observable, Restricted
from lightning_patterning.sgld.chains import DrawRecord
from lightning_patterning.sgld.config import SGLDConfig


class _ChainSums:
    """Named per-chain sums ``[chains, ...]`` (float64)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], chains: int) -> None:
        self.sums = {name: torch.zeros(chains, *shape, dtype=torch.float64) for name, shape in shapes.items()}

    def drop(self, diverged: torch.Tensor) -> None:
        """Remove diverged chains from every sum (their ``n`` becomes 0)."""
        for tensor in self.sums.values():
            tensor[diverged] = 0.0

    @staticmethod
    def _active(record: DrawRecord) -> torch.Tensor:
        return record.active.to(torch.float64)


class FullChainSums(_ChainSums):
    """Sums of the unrestricted chains: loss ``L``, probe losses ``ℓ`` [N] and plain observables ``φ`` [k]."""

    def __init__(self, chains: int, probe_size: int, observables: int) -> None:
        k, n = observables, probe_size
        super().__init__({"n": (), "L": (), "l": (n,), "phi": (k,), "phiL": (k,), "phil": (k, n)}, chains)

    def add(self, record: DrawRecord, loss: torch.Tensor, probe: torch.Tensor, phi: torch.Tensor) -> None:
        a = self._active(record)
        s = self.sums
        s["n"] += a
        s["L"] += a * loss
        s["l"] += a[:, None] * probe
        s["phi"] += a[:, None] * phi
        s["phiL"] += a[:, None] * phi * loss[:, None]
        s["phil"] += a[:, None, None] * phi[:, :, None] * probe[:, None, :]


class RestrictedChainSums(_ChainSums):
    """Sums of a chain set restricted to one component: ``g = L − L(w*)`` paired with ``L`` and ``ℓ``."""

    def __init__(self, chains: int, probe_size: int, center_loss: float) -> None:
        super().__init__({"n": (), "L": (), "g": (), "gL": (), "gl": (probe_size,)}, chains)
        self.center_loss = center_loss

    def add(self, record: DrawRecord, loss: torch.Tensor, probe: torch.Tensor) -> None:
        a = self._active(record)
        s = self.sums
        g = loss - self.center_loss
        s["n"] += a
        s["L"] += a * loss
        s["g"] += a * g
        s["gL"] += a * g * loss
        s["gl"] += a[:, None] * g[:, None] * probe


def plain_chi(sums: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``χ = −(E[φ(ℓ − L)] − E[φ]·E[ℓ − L])`` [..., k, N] and ``μ = E[φ]`` [..., k] from sums with a leading
    dimension of any size (chains, or 1 for the pooled estimate)."""
    n = sums["n"][..., None]
    e_phi = sums["phi"] / n
    e_delta = (sums["l"] - sums["L"][..., None]) / n
    e_phi_delta = (sums["phil"] - sums["phiL"][..., None]) / n[..., None]
    return -(e_phi_delta - e_phi[..., None] * e_delta[..., None, :]), e_phi


def restricted_chi(
    sums: dict[str, torch.Tensor], full_delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """devinterp's ``χ̃ = E_C[g(L − ℓ)] − E_C[g]·(E_full[L] − E_full[ℓ])`` [..., N] and ``E_C[g]`` [...]."""
    n = sums["n"]
    e_g = sums["g"] / n
    e_g_delta = (sums["gL"][..., None] - sums["gl"]) / n[..., None]
    return e_g_delta - e_g[..., None] * full_delta, e_g


def reduce_sums(
    full: FullChainSums,
    restricted: dict[str, RestrictedChainSums],
    observables: list[Observable],
    plain: list[Observable],
    probe: ProbeColumns,
    chain_ids: list[int],
    config: SGLDConfig,
    center_loss: float,
    all_reduce: AllReduce,
) -> Susceptibilities:
    """All-reduce the per-chain sums, then compute the pooled matrix, jackknife standard errors and μ."""
    groups = {"full": full.sums, **{name: s.sums for name, s in restricted.items()}}
    groups = _all_reduce_sums(groups, chain_ids, config.num_chains, all_reduce)
    full_sums = groups["full"]
    valid = full_sums["n"] > 0
    pooled_full = {k: v[valid].sum(dim=0, keepdim=True) for k, v in full_sums.items()}
    chi_plain, mu_plain = plain_chi(pooled_full)
    chi_plain_chains, _ = plain_chi(_leave_one_out({k: v[valid] for k, v in full_sums.items()}))
    full_delta = _delta(pooled_full)[0]
    rows, errors, mus, kinds = {}, {}, {}, {}
    nbeta = config.resolved_nbeta
    columns = probe.columns
    for i, observable in enumerate(plain):
        rows[observable.name] = columns(chi_plain[0, i])
        errors[observable.name] = _stderr(columns(chi_plain_chains[:, i]))
        mus[observable.name] = float(mu_plain[0, i])
        kinds[observable.name] = type(observable).__name__
    for name in restricted:
        sums = groups[name]
        ok = (sums["n"] > 0) & valid  # jackknife replicates leave chain c out of both chain sets
        pooled = {k: v[ok].sum(dim=0, keepdim=True) for k, v in sums.items()}
        chi, e_g = restricted_chi(pooled, full_delta)
        full_loo = _delta(_leave_one_out({k: v[ok] for k, v in full_sums.items()}))
        chi_chains, _ = restricted_chi(_leave_one_out({k: v[ok] for k, v in sums.items()}), full_loo)
        rows[name], errors[name] = columns(chi[0]), _stderr(columns(chi_chains))
        mus[name] = nbeta * float(e_g[0])
        kinds[name] = Restricted.__name__
    names = [o.name for o in observables]
    matrix = torch.stack([rows[n] for n in names])
    stderr = torch.stack([errors[n] for n in names])
    diverged = {n: int(config.num_chains - int((g["n"] > 0).sum())) for n, g in groups.items()}
    return Susceptibilities(
        matrix=matrix.float(),
        stderr=stderr.float(),
        mu=torch.tensor([mus[n] for n in names], dtype=torch.float32),
        names=names,
        kinds=[kinds[n] for n in names],
        sample_ids=probe.sample_ids,
        group_names=probe.group_names,
        group_index=probe.group_index,
        token_mask=probe.token_mask,
        nbeta=nbeta,
        center_loss=center_loss,
        diverged_chains=diverged,
        config=config.to_dict(),
    )


def _delta(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """``E[L] − E[ℓ_z]`` [..., N] of unrestricted chain sums."""
    return (sums["L"][..., None] - sums["l"]) / sums["n"][..., None]


def _leave_one_out(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per chain c, the pooled sums of all chains but c (jackknife replicates)."""
    return {k: v.sum(dim=0, keepdim=True) - v for k, v in sums.items()}


def _stderr(replicates: torch.Tensor) -> torch.Tensor:
    """Jackknife standard error over chains: ``√((C−1)/C · Σ_c (θ_(c) − θ̄)²)`` from the leave-one-chain-out
    estimates ``θ_(c)``. Unlike the spread of per-chain estimates it also covers the between-chain part of
    the pooled covariance (chains that have not mixed)."""
    chains = replicates.shape[0]
    if chains < 2:
        return torch.full(replicates.shape[1:], math.nan, dtype=replicates.dtype)
    centred = replicates - replicates.mean(dim=0, keepdim=True)
    return ((chains - 1) / chains * centred.square().sum(dim=0)).sqrt()


def _all_reduce_sums(
    groups: dict[str, dict[str, torch.Tensor]], chain_ids: list[int], total: int, all_reduce: AllReduce
) -> dict[str, dict[str, torch.Tensor]]:
    rows = torch.tensor(chain_ids, dtype=torch.long)
    pieces, layout = [], []
    for group, sums in groups.items():
        for name, local in sums.items():
            full = torch.zeros(total, *local.shape[1:], dtype=torch.float64)
            full[rows] = local
            pieces.append(full.flatten())
            layout.append((group, name, full.shape))
    flat = all_reduce(torch.cat(pieces).to(_reduce_device(all_reduce))).cpu().double()
    out: dict[str, dict[str, torch.Tensor]] = {g: {} for g in groups}
    offset = 0
    for group, name, shape in layout:
        size = math.prod(shape)
        out[group][name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return out
