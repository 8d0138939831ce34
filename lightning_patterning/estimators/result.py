"""The susceptibility matrix as a result object: rows, columns, errors, PCA, and a safe file format."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

FORMAT = "lightning_patterning.susceptibilities"
VERSION = 1


@dataclass
class Susceptibilities:
    """A susceptibility matrix ``χ`` [k observables × N probe samples, or G groups], or ``[k, N, T]`` when
    tokens are samples (a loss function returning per-position losses; docs/concepts/susceptibilities.md).

    Convention (one place, docs/concepts/susceptibilities.md):
    ``matrix = χ = −Cov[φ, ℓ_z − L] = (1/nβ)·∂⟨φ⟩/∂h``; the raw
    Jacobian is ``nβ·matrix`` (``jacobian()``). Rows of ``Restricted`` observables carry devinterp's
    two-chain estimate, which is ``χ`` times an unknown positive per-row factor: compare them after
    standardizing rows (``standardized()``, ``pca()``).

    Tokens as samples: ``matrix`` and ``stderr`` are ``[k, N, T]`` with NaN at the positions the loss
    function masked out (``token_mask`` is False there). ``flattened()`` gives the ``[k, M]`` matrix of the
    ``M`` valid tokens (row-major order: probe sample, then position), on which ``standardized()`` and
    ``pca()`` work: ``pca()``'s ``V`` is ``[M, r]`` in that order, ``standardized()`` keeps the ``[k, N, T]``
    layout (NaN at invalid positions). With groups the matrix is ``[k, G]`` as for per-sample columns.

    Attributes:
        matrix: ``[k, N or G]`` (or ``[k, N, T]``) pooled estimate.
        stderr: same shape, jackknife standard error over chains (leave one chain out).
        mu: ``[k]`` posterior means of the observables (for ``Restricted`` and ``LLC``: the LLC).
        names: observable names (rows). kinds: their classes' names.
        sample_ids: ``[N]`` dataset indices of the probe samples.
        group_names: column labels when columns are groups (``None``: per-sample columns).
        group_index: ``[N]`` group of each probe sample (``[N, T]`` per token, −1 at invalid positions;
            ``None`` without groups).
        nbeta: inverse temperature. center_loss: ``L(w*)`` on the fixed loss batches.
        diverged_chains: per chain set (``"full"`` and each restricted name), chains dropped.
        config: the ``SGLDConfig`` as a dictionary. metadata: free-form JSON (e.g. step, epoch).
        token_mask: ``[N, T]`` True at the probe positions that are samples (``None``: per-sample losses).
        positions: ``[M]`` position of each column within its probe sample, for a ``flattened()`` token
            matrix (``sample_ids`` then holds each column's sample); ``None`` otherwise.
    """

    matrix: torch.Tensor
    stderr: torch.Tensor
    mu: torch.Tensor
    names: list[str]
    kinds: list[str]
    sample_ids: torch.Tensor
    group_names: list[str] | None
    group_index: torch.Tensor | None
    nbeta: float
    center_loss: float
    diverged_chains: dict[str, int]
    config: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    @property
    def per_token(self) -> bool:
        """Whether the matrix is ``[k, N, T]`` (tokens as samples, no groups)."""
        return self.matrix.ndim == 3

    @property
    def columns(self) -> list[str]:
        """Column labels: group names, the probe samples' dataset indices, or ``"{sample}:{position}"`` for
        each valid token (in ``flattened()`` order)."""
        if self.group_names is not None:
            return self.group_names
        if self.per_token:
            return self.flattened().columns
        if self.positions is not None:
            pairs = zip(self.sample_ids.tolist(), self.positions.tolist(), strict=True)
            return [f"{i}:{t}" for i, t in pairs]
        return [str(i) for i in self.sample_ids.tolist()]

    def flattened(self) -> Susceptibilities:
        """The ``[k, M]`` result of the ``M`` valid tokens of a ``[k, N, T]`` matrix (row-major: sample, then
        position), with ``sample_ids`` and ``positions`` per column; any other result is returned as is."""
        if not self.per_token:
            return self
        mask = self._valid_tokens()
        where = torch.nonzero(mask)
        return replace(
            self,
            matrix=self.matrix[:, mask],
            stderr=self.stderr[:, mask],
            sample_ids=self.sample_ids[where[:, 0]],
            positions=where[:, 1],
            group_names=None,
            group_index=None,
            token_mask=None,
        )

    def row(self, name: str) -> torch.Tensor:
        """The row of observable ``name``."""
        if name not in self.names:
            raise KeyError(f"no observable named {name!r}; rows are {self.names}")
        return self.matrix[self.names.index(name)]

    def jacobian(self) -> torch.Tensor:
        """``∂⟨φ⟩/∂h = nβ·χ`` (meaningful for non-restricted rows)."""
        return self.nbeta * self.matrix

    def _valid_tokens(self) -> torch.Tensor:
        """``[N, T]`` positions of a ``[k, N, T]`` matrix that are samples."""
        if self.token_mask is not None:
            return self.token_mask.bool()
        return ~torch.isnan(self.matrix).all(dim=0)

    def standardized(self) -> torch.Tensor:
        """Rows z-scored across columns (mean 0, std 1); constant rows become 0. For a ``[k, N, T]``
        matrix the z-score runs over the valid tokens, and invalid positions stay NaN."""
        if self.per_token:
            flat = self.flattened()
            out = torch.full_like(self.matrix, torch.nan)
            out[:, self._valid_tokens()] = flat.standardized()
            return out
        centred = self.matrix - self.matrix.mean(dim=1, keepdim=True)
        scale = centred.std(dim=1, keepdim=True)
        return torch.where(scale > 0, centred / scale.clamp_min(torch.finfo(scale.dtype).tiny), 0.0)

    def pca(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U, S, V`` with ``standardized() = U·diag(S)·Vᵀ``: columns of ``U`` [k, r] are loadings on
        observables (components), columns of ``V`` [N, r] loadings on data; signs fixed so that each ``u_j``
        has a positive sum (deterministic across runs). For a ``[k, N, T]`` matrix, ``V`` is ``[M, r]`` over
        the valid tokens in ``flattened()`` order."""
        if self.per_token:
            return self.flattened().pca()
        u, s, vh = torch.linalg.svd(self.standardized().double(), full_matrices=False)
        signs = torch.where(u.sum(dim=0) < 0, -1.0, 1.0).to(u.dtype)
        return (u * signs).float(), s.float(), (vh.T * signs).float()

    def explained_variance(self) -> torch.Tensor:
        """Fraction of the standardized matrix's variance carried by each principal component."""
        _, s, _ = self.pca()
        power = s.double() ** 2
        return (power / power.sum()).float()

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """Write tensors plus JSON metadata (``torch.save``); ``load`` reads it with ``weights_only=True``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "names": self.names,
            "kinds": self.kinds,
            "group_names": self.group_names,
            "nbeta": self.nbeta,
            "center_loss": _json_float(self.center_loss),
            "diverged_chains": self.diverged_chains,
            "config": self.config,
            "metadata": self.metadata,
        }
        tensors = {"matrix": self.matrix, "stderr": self.stderr, "mu": self.mu, "sample_ids": self.sample_ids}
        for name in ("group_index", "token_mask", "positions"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        torch.save({"meta": json.dumps(meta), "tensors": tensors}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Susceptibilities:
        """Read a file written by ``save``. Never executes code from the file (``weights_only=True``)."""
        path = Path(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(payload["meta"])
            tensors = payload["tensors"]
        except FileNotFoundError:
            raise
        except Exception as error:
            raise ValueError(
                f"{path} is not a readable susceptibilities file ({error.__class__.__name__}: "
                f"{str(error)[:200]})"
            ) from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a lightning_patterning susceptibilities file")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path}: unsupported susceptibilities file version {meta.get('version')!r}")
        try:
            return cls(
                matrix=tensors["matrix"],
                stderr=tensors["stderr"],
                mu=tensors["mu"],
                names=list(meta["names"]),
                kinds=list(meta["kinds"]),
                sample_ids=tensors["sample_ids"],
                group_names=meta["group_names"],
                group_index=tensors.get("group_index"),
                nbeta=float(meta["nbeta"]),
                center_loss=_from_json_float(meta["center_loss"]),
                diverged_chains=dict(meta["diverged_chains"]),
                config=dict(meta["config"]),
                metadata=dict(meta["metadata"]),
                token_mask=tensors.get("token_mask"),
                positions=tensors.get("positions"),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: susceptibilities file is missing {error}") from error


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def _from_json_float(value: float | None) -> float:
    return math.nan if value is None else float(value)
