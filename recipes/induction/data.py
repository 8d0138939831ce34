"""Data for the induction recipe: byte windows of real text, and the repeated-sequence induction probe.

The corpus is the Python standard library's own source code (``.py`` files next to ``os.py``): real,
structured text that is on every machine, so nothing is downloaded. Its content depends on the Python
version, so byte-identical data needs the same Python version; for a given version everything here is a
deterministic function of the seed.
"""

from __future__ import annotations

import functools
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

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


# ------------------------------------------------------------------------------------------------------------
# The recipe's data: a train/validation split of the corpus, windows with a duplicated random span, probes

VALIDATION_EVERY = 20
"""Every 20th standard-library file (in sorted order, from the 20th on) is held out for validation and the
natural-text probe; the other 95 % are training text."""

PRINTABLE = (32, 127)
"""Printable ASCII, bytes 32 (space) … 126 (``~``): the alphabet of the random spans and the random probe."""


@functools.lru_cache(maxsize=2)
def stdlib_split(split: str) -> bytes:
    """The training or validation text of the standard library: its files in sorted path order, joined by
    newlines; file ``i`` (0-based) is validation text when ``i % 20 == 19``, training text otherwise.

    The split does not depend on any seed, so every run trains and validates on the same text.

    Args:
        split: ``"train"`` or ``"val"``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = stdlib_files()
    held_out = [i % VALIDATION_EVERY == VALIDATION_EVERY - 1 for i in range(len(files))]
    chosen = [path for path, val in zip(files, held_out, strict=True) if val == (split == "val")]
    chunks = []
    for path in chosen:
        with open(path, "rb") as handle:
            chunks.append(handle.read() + b"\n")
    return b"".join(chunks)


def windows_of(text: bytes, n_windows: int, context: int, generator: torch.Generator) -> torch.Tensor:
    """``n_windows`` windows of ``context`` consecutive bytes of ``text`` at uniform random starts.

    Returns:
        A uint8 tensor ``[n_windows, context]``.
    """
    if not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"n_windows must be an int >= 1, got {n_windows!r}")
    if not isinstance(context, int) or context < 2 or context > len(text):
        raise ValueError(f"context must be an int in [2, {len(text)}] (the text's length), got {context!r}")
    corpus = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    starts = torch.randint(len(text) - context + 1, (n_windows,), generator=generator)
    return corpus[starts[:, None] + torch.arange(context)]


def duplicate_random_spans(
    windows: torch.Tensor, min_length: int, max_length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write one random printable-ASCII span into every window, at a random position and again later.

    For window ``i`` of length ``T``: a length ``L_i`` uniform on ``[min_length, max_length]``, a first
    start ``a_i`` uniform on ``[0, T − 2L_i]``, a second start ``b_i`` uniform on ``[a_i + L_i, T − L_i]``
    (so the copies do not overlap and both fit), and ``L_i`` bytes uniform on printable ASCII (32–126),
    written at ``a_i`` and at ``b_i``. From ``b_i + 1`` on, every byte of the second copy is predictable by
    induction (find the current byte's earlier occurrence, copy its successor); nothing else is.

    Args:
        windows: byte windows ``[N, T]`` (any integer dtype); not modified.
        min_length: shortest span (>= 2).
        max_length: longest span (>= min_length, and ``2 · max_length <= T``).
        generator: the randomness.

    Returns:
        The windows with their spans (a new tensor, same dtype), the starts ``[N, 2]`` (``a_i``, ``b_i``) and
        the lengths ``[N]`` (LongTensors).
    """
    if windows.ndim != 2 or windows.is_floating_point():
        raise TypeError("windows must be an integer tensor [N, T]")
    length = windows.shape[1]
    if not isinstance(min_length, int) or min_length < 2:
        raise ValueError(f"min_length must be an int >= 2, got {min_length!r}")
    if not isinstance(max_length, int) or max_length < min_length or 2 * max_length > length:
        raise ValueError(
            f"max_length must be an int in [min_length, T/2] = [{min_length}, {length // 2}], "
            f"got {max_length!r}"
        )
    n = windows.shape[0]
    lengths = torch.randint(min_length, max_length + 1, (n,), generator=generator)
    first = (torch.rand(n, generator=generator, dtype=torch.float64) * (length - 2 * lengths + 1)).long()
    room = length - lengths - (first + lengths) + 1  # choices for the second start
    second = first + lengths + (torch.rand(n, generator=generator, dtype=torch.float64) * room).long()
    spans = torch.randint(*PRINTABLE, (n, max_length), generator=generator, dtype=windows.dtype)
    out = windows.clone()
    rows = torch.arange(n)
    for offset in range(max_length):
        inside = offset < lengths
        out[rows[inside], first[inside] + offset] = spans[inside, offset]
        out[rows[inside], second[inside] + offset] = spans[inside, offset]
    return out, torch.stack([first, second], dim=1), lengths


def repeated_random(n: int, context: int, seed: int) -> torch.Tensor:
    """The in-context probe on random tokens: ``[a, a]`` with ``a`` ``context/2`` bytes uniform on printable
    ASCII (32–126), the alphabet the model has seen; ``context`` must be even.

    Returns:
        A LongTensor ``[n, context]``.
    """
    if not isinstance(context, int) or context < 4 or context % 2:
        raise ValueError(f"context must be an even int >= 4, got {context!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    half = torch.randint(*PRINTABLE, (n, context // 2), generator=torch.Generator().manual_seed(seed))
    return torch.cat([half, half], dim=1)


def repeated_natural(n: int, context: int, seed: int) -> torch.Tensor:
    """The in-context probe on natural text: ``[s, s]`` with ``s`` a random ``context/2``-byte segment of
    the validation text (``stdlib_split("val")``), which no training window resembles (training windows
    repeat random printable spans, not natural text); ``context`` must be even.

    Returns:
        A LongTensor ``[n, context]``.
    """
    if not isinstance(context, int) or context < 4 or context % 2:
        raise ValueError(f"context must be an even int >= 4, got {context!r}")
    generator = torch.Generator().manual_seed(seed)
    half = windows_of(stdlib_split("val"), n, context // 2, generator).long()
    return torch.cat([half, half], dim=1)


class TokenWindows(Dataset):
    """A map-style dataset of byte windows stored as uint8; item ``i`` is a LongTensor ``[T]``.

    Args:
        windows: an integer tensor ``[N, T]`` of byte values.
    """

    def __init__(self, windows: torch.Tensor) -> None:
        if windows.ndim != 2 or windows.is_floating_point():
            raise TypeError("windows must be an integer tensor [N, T]")
        self.windows = windows.to(torch.uint8)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.windows[index].long()


class InductionData(L.LightningDataModule):
    """The induction recipe's data: training windows with a duplicated random span, validation and probes.

    Sets (built on first use; deterministic in ``seed`` and ``probe_seed``; the run's own seed only
    shuffles the training order):

    * ``train_set``: ``n_train`` windows of ``context`` bytes of training text (``stdlib_split("train")``);
      with ``spans`` each carries one random printable span of ``span_min``–``span_max`` bytes written
      twice (``duplicate_random_spans``; ``span_starts`` ``[N, 2]`` and ``span_lengths`` ``[N]`` say where).
    * ``val_set``: ``n_val`` natural windows of the validation text (the natural-text validation loss).
    * ``random_probe``: ``n_probe`` sequences ``[a, a]`` of random printable bytes (``repeated_random``).
    * ``natural_probe``: ``n_probe`` sequences ``[s, s]`` of validation text (``repeated_natural``).

    ``val_dataloader`` returns ``[val_set, random_probe, natural_probe]`` (the model's validation reads them
    in that order).

    Args:
        n_train: training windows.
        n_val: natural validation windows.
        n_probe: sequences per probe.
        context: bytes per window (even, >= 4).
        spans: write a duplicated random span into every training window (``False``: natural text only).
        span_min: shortest span.
        span_max: longest span (``2 · span_max <= context``).
        seed: seed of the training windows and their spans.
        probe_seed: seed of the validation windows and the probes (the same in every run of a study).
        batch_size: training batch size (evaluation uses batches of 64).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        n_train: int = 100_000,
        n_val: int = 64,
        n_probe: int = 32,
        context: int = 128,
        spans: bool = True,
        span_min: int = 20,
        span_max: int = 60,
        seed: int = 0,
        probe_seed: int = 12345,
        batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in [
            ("n_train", n_train, 1),
            ("n_val", n_val, 1),
            ("n_probe", n_probe, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ]:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(context, int) or context < 4 or context % 2:
            raise ValueError(f"context must be an even int >= 4, got {context!r}")
        if spans and not (2 <= span_min <= span_max <= context // 2):
            raise ValueError(
                f"span_min, span_max must satisfy 2 <= span_min <= span_max <= context/2 = {context // 2}, "
                f"got {span_min}, {span_max}"
            )
        self.save_hyperparameters()
        self.n_train, self.n_val, self.n_probe, self.context = n_train, n_val, n_probe, context
        self.spans, self.span_min, self.span_max = spans, span_min, span_max
        self.seed, self.probe_seed = seed, probe_seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.span_starts: torch.Tensor | None = None
        self.span_lengths: torch.Tensor | None = None

    @functools.cached_property
    def train_set(self) -> TokenWindows:
        """Training windows (with their duplicated spans when ``spans``)."""
        generator = torch.Generator().manual_seed(self.seed)
        windows = windows_of(stdlib_split("train"), self.n_train, self.context, generator)
        if self.spans:
            windows, self.span_starts, self.span_lengths = duplicate_random_spans(
                windows, self.span_min, self.span_max, generator
            )
        return TokenWindows(windows)

    @functools.cached_property
    def val_set(self) -> TokenWindows:
        """Natural windows of the validation text."""
        generator = torch.Generator().manual_seed(self.probe_seed)
        return TokenWindows(windows_of(stdlib_split("val"), self.n_val, self.context, generator))

    @functools.cached_property
    def random_probe(self) -> TokenWindows:
        """Repeated random printable sequences ``[a, a]``."""
        return TokenWindows(repeated_random(self.n_probe, self.context, self.probe_seed + 1))

    @functools.cached_property
    def natural_probe(self) -> TokenWindows:
        """Repeated validation-text segments ``[s, s]``."""
        return TokenWindows(repeated_natural(self.n_probe, self.context, self.probe_seed + 2))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(s, 64) for s in (self.val_set, self.random_probe, self.natural_probe)]
