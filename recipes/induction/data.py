"""Data for the induction recipe: byte windows of real text, and the repeated-sequence induction probe.

The corpus is the Python standard library's own source code (``.py`` files next to ``os.py``): real,
structured text that is on every machine, so nothing is downloaded. Its content depends on the Python
version, so byte-identical data needs the same Python version; for a given version everything here is a
deterministic function of the seed.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.utils.data import Dataset

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
"""Directories of the standard library that are not read (installed packages and test suites)."""

DEFAULT_MAX_BYTES = 1 << 24
"""Corpus size used by ``byte_windows``: 16 MiB, more than the whole standard library of CPython 3.11."""


def stdlib_files() -> list[str]:
    """Paths of the standard library's ``.py`` files in sorted order, without tests and site-packages."""
    root = os.path.dirname(os.__file__)
    paths: list[str] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS)
        paths.extend(
            os.path.join(directory, f)
            for f in sorted(files)
            if f.endswith(".py") and not f.startswith("test_")
        )
    if not paths:
        raise RuntimeError(f"no standard-library .py files found under {root}")
    return sorted(paths)


@functools.lru_cache(maxsize=4)
def stdlib_text(max_bytes: int, seed: int) -> bytes:
    """Up to ``max_bytes`` bytes of standard-library source, files joined by newlines.

    The files are read in sorted path order starting at a file chosen by ``seed`` (wrapping around at the
    end), so different seeds start at different places in the library and the same seed always gives the
    same bytes. Reading stops once ``max_bytes`` bytes are collected or every file has been read once.

    Args:
        max_bytes: the most bytes returned (>= 1).
        seed: chooses the first file.

    Returns:
        The concatenated bytes.
    """
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
    files = stdlib_files()
    start = int(torch.randint(len(files), (1,), generator=torch.Generator().manual_seed(seed)))
    chunks: list[bytes] = []
    size = 0
    for path in files[start:] + files[:start]:
        with open(path, "rb") as handle:
            chunk = handle.read(max_bytes - size) + b"\n"
        chunks.append(chunk)
        size += len(chunk)
        if size >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def byte_windows(n_windows: int, context: int, seed: int, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """``n_windows`` random windows of ``context`` consecutive bytes of ``stdlib_text(max_bytes, seed)``.

    Args:
        n_windows: number of windows (>= 1).
        context: bytes per window (>= 2, so that there is a next token to predict).
        seed: seeds the corpus start and the window positions.
        max_bytes: size of the corpus the windows are drawn from.

    Returns:
        A LongTensor ``[n_windows, context]`` of byte values 0–255.
    """
    if not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"n_windows must be an int >= 1, got {n_windows!r}")
    if not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an int >= 2, got {context!r}")
    text = stdlib_text(max_bytes, seed)
    if len(text) < context:
        raise ValueError(f"the corpus has {len(text)} bytes, fewer than context={context}")
    corpus = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(len(text) - context + 1, (n_windows,), generator=generator)
    return corpus[starts[:, None] + torch.arange(context)].long()


def repeated_halves(n: int, context: int, seed: int, vocab: int = 256) -> torch.Tensor:
    """Random token sequences whose second half repeats the first: the in-context (induction) probe.

    Row ``i`` is ``[a_1 … a_m, a_1 … a_m]`` with ``m = context // 2`` and ``a_j`` uniform on the vocabulary;
    an odd ``context`` gets one extra random token in front. A model with induction heads predicts the
    second copy far better than the first (Olsson et al., 2022).

    Args:
        n: number of sequences (>= 1).
        context: sequence length (>= 2).
        seed: seeds the tokens.
        vocab: tokens are drawn from ``0 … vocab − 1``.

    Returns:
        A LongTensor ``[n, context]``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an int >= 2, got {context!r}")
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"vocab must be an int >= 1, got {vocab!r}")
    generator = torch.Generator().manual_seed(seed)
    half = torch.randint(vocab, (n, context // 2), generator=generator)
    lead = torch.randint(vocab, (n, context % 2), generator=generator)
    return torch.cat([lead, half, half], dim=1)


class WindowDataset(Dataset):
    """A map-style dataset of byte windows of standard-library source (``byte_windows``).

    Item ``i`` is a LongTensor ``[context]``, so the default collate gives ``[B, context]`` batches.

    Args:
        n_windows: number of windows.
        context: bytes per window.
        seed: seeds the corpus start and the window positions.
        max_bytes: size of the corpus the windows are drawn from.
    """

    def __init__(
        self, n_windows: int, context: int = 32, seed: int = 0, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.windows = byte_windows(n_windows, context, seed, max_bytes)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.windows[index]
