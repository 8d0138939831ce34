"""Data for the balanced-parentheses recipe (Wang & Murfet 2026, arXiv 2601.13548),
generated on the fly from a seed.

Strings are over ``"("`` and ``")"``. A string's *running depth* after ``t`` characters is
``#"(" − #")"`` among them.

* TRUE strings are Dyck words: the running depth never goes below zero and ends at zero. Each is drawn
  uniformly among the Dyck words of its length (cycle lemma, below); lengths are even.
* FALSE strings never have equal counts of ``"("`` and ``")"``. ``false_kind="random"`` draws a uniformly
  random string of the length and rejects equal counts; ``false_kind="flip"`` flips one character of a
  uniform Dyck word (odd lengths: inserts one character into a Dyck word), which gives FALSE strings that
  look locally like TRUE ones, with imbalance exactly 2 (or 1). ``false_close_fraction`` is the
  probability that a FALSE string has more ``")"`` than ``"("`` (such a string always dips below zero).
* OOD strings have equal counts but are not nested (the running depth dips below zero, e.g. ``")("``,
  ``"())("``). They are never trained on. EQUAL-COUNT (``#"(" = #")"``) calls them TRUE, NESTED calls
  them FALSE, and the fraction a model answers FALSE is its *nested score*.

Both rules fit the training set perfectly, so which one a model learns is the outcome of training.

Uniform Dyck words (cycle lemma, Dvoretzky & Motzkin 1947): arrange ``m`` up-steps and ``m + 1``
down-steps uniformly at random; exactly one of the ``2m + 1`` rotations has all proper prefix sums
``>= 0``, the one starting right after the first minimum of the prefix sums. That rotation is a Dyck word
of length ``2m`` followed by ``")"``, and every Dyck word arises from exactly ``2m + 1`` arrangements, so
the word is uniform.

Tokens: ``[CLS, c_1, …, c_L, PAD, …]`` with ids ``PAD=0, "("=1, ")"=2, CLS=3``, padded to
``max_length + 1``. Every set is a deterministic function of ``(seed, set name)`` and its sizes, so
changing the training size leaves the validation and OOD sets unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from functools import cached_property

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

PAD, OPEN, CLOSE, CLS = 0, 1, 2, 3
VOCAB_SIZE = 4
FALSE_KINDS = ("random", "flip")
_CHARS = {OPEN: "(", CLOSE: ")"}


# ----------------------------------------------------------------------------------------------------
# Helpers on strings


def _check_string(s: str) -> None:
    if not isinstance(s, str) or set(s) - {"(", ")"}:
        raise ValueError(f"expected a string of '(' and ')', got {s!r}")


def running_depths(s: str) -> list[int]:
    """Running depth after each character of ``s`` (``#"(" − #")"`` so far), without the empty prefix."""
    _check_string(s)
    depths, depth = [], 0
    for char in s:
        depth += 1 if char == "(" else -1
        depths.append(depth)
    return depths


def max_depth(s: str) -> int:
    """Largest running depth of ``s`` (0 for the empty string or one that only goes down)."""
    return max([0, *running_depths(s)])


def min_prefix_depth(s: str) -> int:
    """Lowest running depth of ``s``, the empty prefix (depth 0) included: 0 if it never dips below zero.

    For an OOD string (equal counts, not nested) this is how far it dips below zero: −1 for ``")("``,
    −2 for ``"))(("``.
    """
    return min([0, *running_depths(s)])


def count_imbalance(s: str) -> int:
    """``|#"(" − #")"|``: 0 exactly when EQUAL-COUNT calls ``s`` TRUE."""
    _check_string(s)
    return abs(s.count("(") - s.count(")"))


def is_nested(s: str) -> bool:
    """Whether ``s`` is a Dyck word (NESTED's answer): never below zero and ends at zero."""
    return count_imbalance(s) == 0 and min_prefix_depth(s) == 0


def is_equal_count(s: str) -> bool:
    """Whether ``s`` has as many ``"("`` as ``")"`` (EQUAL-COUNT's answer)."""
    return count_imbalance(s) == 0


def boundary_violation(s: str) -> bool:
    """Whether ``s`` starts with ``")"`` or ends with ``"("``: something no Dyck word does.

    A model can reject such OOD strings by looking at the two ends only, without tracking depth.
    """
    _check_string(s)
    return bool(s) and (s[0] == ")" or s[-1] == "(")


# ----------------------------------------------------------------------------------------------------
# Helpers on step tensors (+1 for "(", −1 for ")", 0 for padding) and tokens


def steps_of_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Steps ``[..., T]``: +1 for ``"("``, −1 for ``")"``, 0 for CLS and padding."""
    return (tokens == OPEN).long() - (tokens == CLOSE).long()


def min_prefix_depths(tokens: torch.Tensor) -> torch.Tensor:
    """``min_prefix_depth`` of every row of a token tensor ``[N, T]`` (``<= 0``), as a LongTensor ``[N]``."""
    depths = steps_of_tokens(tokens).cumsum(dim=-1)
    return depths.amin(dim=-1).clamp(max=0)


def boundary_violations(tokens: torch.Tensor) -> torch.Tensor:
    """``boundary_violation`` of every row of a token tensor ``[N, T]`` (tokens start with CLS)."""
    lengths = (tokens == OPEN).sum(-1) + (tokens == CLOSE).sum(-1)
    first = tokens[:, 1]
    last = tokens.gather(1, lengths.clamp(min=1)[:, None]).squeeze(1)
    return (lengths > 0) & ((first == CLOSE) | (last == OPEN))


def encode(strings: Sequence[str], max_length: int) -> torch.Tensor:
    """Token tensor ``[N, max_length + 1]``: CLS, the characters, then PAD."""
    tokens = torch.full((len(strings), max_length + 1), PAD, dtype=torch.long)
    tokens[:, 0] = CLS
    for row, s in enumerate(strings):
        _check_string(s)
        if len(s) > max_length:
            raise ValueError(f"string of length {len(s)} is longer than max_length={max_length}")
        tokens[row, 1 : len(s) + 1] = torch.tensor([OPEN if c == "(" else CLOSE for c in s], dtype=torch.long)
    return tokens


def decode(tokens: torch.Tensor) -> list[str]:
    """The strings of a token tensor ``[N, T]`` (CLS and PAD dropped)."""
    return ["".join(_CHARS[t] for t in row.tolist() if t in _CHARS) for row in tokens]


# ----------------------------------------------------------------------------------------------------
# Generators (vectorized per length; all randomness from ``generator``)


def _arrangements(count: int, length: int, ups: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, length]`` uniform arrangements of ``ups`` +1 steps and ``length − ups`` −1 steps."""
    ranks = torch.rand(count, length, generator=generator).argsort(dim=1)
    return torch.where(ranks < ups, 1, -1)


def random_dyck_steps(count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` uniformly random Dyck words of even ``length`` as steps ``[count, length]`` (cycle lemma)."""
    if length % 2 or length < 0:
        raise ValueError(f"Dyck words have even length >= 0, got {length}")
    half = length // 2
    cycle = _arrangements(count, length + 1, half, generator)  # m ups, m + 1 downs: sum −1
    prefix = torch.cat([torch.zeros(count, 1, dtype=cycle.dtype), cycle.cumsum(dim=1)], dim=1)
    start = prefix.argmin(dim=1) % (length + 1)  # argmin returns the first minimum
    index = (start[:, None] + torch.arange(length + 1)) % (length + 1)
    return cycle.gather(1, index)[:, :length]  # the dropped last step is the final ")"


def random_ood_steps(count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, length]``: uniformly random equal-count, non-nested strings of even ``length >= 2``."""
    if length % 2 or length < 2:
        raise ValueError(f"OOD strings have even length >= 2, got {length}")
    kept: list[torch.Tensor] = []
    found = 0
    while found < count:
        candidates = _arrangements(2 * (count - found) + 8, length, length // 2, generator)
        candidates = candidates[candidates.cumsum(dim=1).amin(dim=1) < 0]
        kept.append(candidates)
        found += candidates.shape[0]
    return torch.cat(kept)[:count]


def random_false_steps(
    count: int, length: int, generator: torch.Generator, kind: str = "random", close_fraction: float = 0.5
) -> torch.Tensor:
    """``count`` strings of ``length`` with unequal counts of ``"("`` and ``")"``, ``[count, length]``.

    Args:
        count: number of strings.
        length: their length (>= 1).
        generator: source of randomness.
        kind: ``"random"`` (uniform among unequal-count strings of a given sign) or ``"flip"`` (one
            character of a uniform Dyck word flipped, or one inserted when ``length`` is odd).
        close_fraction: probability that a string has more ``")"`` than ``"("``.

    Returns:
        Steps (+1/−1).
    """
    if kind not in FALSE_KINDS:
        raise ValueError(f"kind must be one of {FALSE_KINDS}, got {kind!r}")
    if length < 1:
        raise ValueError(f"FALSE strings have length >= 1, got {length}")
    sign = torch.where(torch.rand(count, generator=generator) < close_fraction, -1, 1)  # sign of #( − #)
    if kind == "random":
        kept: list[torch.Tensor] = []
        found = 0
        while found < count:
            candidates = torch.randint(2, (2 * (count - found) + 8, length), generator=generator) * 2 - 1
            candidates = candidates[candidates.sum(dim=1) != 0]
            kept.append(candidates)
            found += candidates.shape[0]
        steps = torch.cat(kept)[:count]
        # negating a string maps unequal-count strings with #( > #) one-to-one onto those with #( < #)
        return steps * (steps.sum(dim=1).sign() * sign)[:, None]
    if length % 2 == 0:
        steps = random_dyck_steps(count, length, generator)
        # flip a uniformly chosen "(" (sign −1) or ")" (sign +1)
        candidates = steps == -sign[:, None]
        scores = torch.rand(count, length, generator=generator) * candidates
        position = scores.argmax(dim=1)
        steps[torch.arange(count), position] *= -1
        return steps
    if length == 1:
        return sign[:, None].clone()
    word = random_dyck_steps(count, length - 1, generator)
    # insert the extra character at a uniform position: result[j] = word[j] (j < p), sign (j = p),
    # word[j − 1] (j > p)
    position = torch.randint(length, (count,), generator=generator)[:, None]
    columns = torch.arange(length)[None, :]
    source = (columns - (columns > position).long()).clamp(max=length - 2)
    return torch.where(columns == position, sign[:, None], word.gather(1, source.expand(count, -1)))


def _stable_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"parentheses/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _by_length(
    count: int,
    lengths: Sequence[int],
    generator: torch.Generator,
    make: Callable[[int, int], torch.Tensor],
    max_length: int,
) -> torch.Tensor:
    """Tokens ``[count, max_length + 1]`` of strings with lengths uniform on ``lengths``, made per length."""
    tokens = torch.full((count, max_length + 1), PAD, dtype=torch.long)
    tokens[:, 0] = CLS
    choice = torch.tensor(list(lengths))[torch.randint(len(lengths), (count,), generator=generator)]
    for length in lengths:
        rows = (choice == length).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        steps = make(rows.numel(), length)
        tokens[rows, 1 : length + 1] = torch.where(steps > 0, OPEN, CLOSE)
    return tokens


class ParenthesesDataset(TensorDataset):
    """A map-style dataset of token rows, labels and sample indices.

    Item ``i`` is ``(tokens [max_length + 1], label, i)`` (all LongTensors); labels are 1 for TRUE and 0
    for FALSE. Subclassing ``TensorDataset`` lets the package's SGLD chains index the tensors directly.

    Args:
        tokens: ``[N, max_length + 1]`` token ids (CLS first, then characters, then PAD).
        labels: ``[N]`` labels in ``{0, 1}``.
    """

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        if tokens.ndim != 2 or labels.shape != (tokens.shape[0],):
            raise ValueError(
                f"tokens must be [N, T] and labels [N], got {list(tokens.shape)}, {list(labels.shape)}"
            )
        super().__init__(tokens.long(), labels.long(), torch.arange(tokens.shape[0]))

    @property
    def tokens(self) -> torch.Tensor:
        """Token ids ``[N, T]``."""
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        """Labels ``[N]`` (1 TRUE, 0 FALSE)."""
        return self.tensors[1]

    @property
    def strings(self) -> list[str]:
        """The strings, decoded."""
        return decode(self.tokens)

    def relabelled(self, label: int) -> ParenthesesDataset:
        """The same strings with every label set to ``label``."""
        return ParenthesesDataset(self.tokens, torch.full_like(self.labels, label))


def collate_trimmed(items: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """``default_collate``, then drop the padding columns that every row of the batch has."""
    tokens, *rest = default_collate(items)
    width = int((tokens != PAD).sum(dim=1).max())
    return [tokens[:, :width], *rest]


class ParenthesesData(L.LightningDataModule):
    """Training, validation, OOD-test and OOD-probe sets for the parentheses experiment.

    Sets (each built on first use, deterministic in ``seed``; the model seed only shuffles batches):

    * ``train_set``: ``n_train`` strings, half TRUE (Dyck words), half FALSE (unequal counts), shuffled.
    * ``val_set``: ``n_val`` strings from the same distribution (in-distribution accuracy).
    * ``ood_test``: ``n_ood_test`` equal-count, non-nested strings labelled 0 (NESTED's answer), so a
      model's accuracy on it is its nested score.
    * ``ood_probe_nested`` / ``ood_probe_equal``: ``n_ood_probe`` further OOD strings, none of them in
      ``ood_test``, labelled FALSE (0, as NESTED would) / TRUE (1, as EQUAL-COUNT would): probe sets for
      patterning observables. None of the OOD sets is ever trained on.

    ``val_dataloader`` returns ``[val_set, ood_test]``; so does ``test_dataloader``.

    Args:
        n_train: training strings (>= 2).
        n_val: in-distribution validation strings.
        n_ood_test: OOD test strings.
        n_ood_probe: OOD probe strings.
        min_length: shortest string (>= 1; TRUE and OOD strings use the even lengths in range, >= 2).
        max_length: longest string (the padded length is ``max_length + 1`` with CLS).
        odd_false: whether FALSE strings may also have odd lengths.
        false_kind: ``"random"`` or ``"flip"`` (see ``random_false_steps``).
        false_close_fraction: probability that a FALSE string has more ``")"`` than ``"("``.
        seed: data seed.
        batch_size: training and evaluation batch size.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        n_train: int = 20_000,
        n_val: int = 2_000,
        n_ood_test: int = 2_000,
        n_ood_probe: int = 512,
        min_length: int = 2,
        max_length: int = 20,
        odd_false: bool = False,
        false_kind: str = "random",
        false_close_fraction: float = 0.5,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in [
            ("n_train", n_train, 2),
            ("n_val", n_val, 1),
            ("n_ood_test", n_ood_test, 1),
            ("n_ood_probe", n_ood_probe, 1),
            ("min_length", min_length, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ]:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(max_length, int) or max_length < max(2, min_length):
            raise ValueError(f"max_length must be an int >= max(2, min_length), got {max_length!r}")
        if false_kind not in FALSE_KINDS:
            raise ValueError(f"false_kind must be one of {FALSE_KINDS}, got {false_kind!r}")
        if not 0.0 <= false_close_fraction <= 1.0:
            raise ValueError(f"false_close_fraction must be in [0, 1], got {false_close_fraction!r}")
        self.save_hyperparameters()
        self.n_train, self.n_val, self.n_ood_test, self.n_ood_probe = n_train, n_val, n_ood_test, n_ood_probe
        self.min_length, self.max_length = min_length, max_length
        self.odd_false, self.false_kind, self.false_close_fraction = (
            odd_false,
            false_kind,
            false_close_fraction,
        )
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers

    @property
    def even_lengths(self) -> list[int]:
        """Lengths of TRUE and OOD strings: the even numbers in ``[max(2, min_length), max_length]``."""
        return [n for n in range(max(2, self.min_length), self.max_length + 1) if n % 2 == 0]

    @property
    def false_lengths(self) -> list[int]:
        """Lengths of FALSE strings: the even ones, or all in range when ``odd_false``."""
        if self.odd_false:
            return list(range(self.min_length, self.max_length + 1))
        return self.even_lengths

    def _generator(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(_stable_seed(self.seed, name))

    def _dyck_words(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` uniform Dyck words, spread over the even lengths, as padded tokens."""
        return _by_length(
            n,
            self.even_lengths,
            generator,
            lambda count, length: random_dyck_steps(count, length, generator),
            self.max_length,
        )

    def _false_strings(self, n: int, lengths: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """``n`` FALSE strings (``false_kind``, ``false_close_fraction``) spread over ``lengths``, as padded
        tokens."""
        return _by_length(
            n,
            lengths,
            generator,
            lambda count, length: random_false_steps(
                count, length, generator, self.false_kind, self.false_close_fraction
            ),
            self.max_length,
        )

    def _labelled(self, n: int, name: str) -> ParenthesesDataset:
        generator = self._generator(name)
        n_true = (n + 1) // 2
        true = self._dyck_words(n_true, generator)
        false = self._false_strings(n - n_true, self.false_lengths, generator)
        order = torch.randperm(n, generator=generator)
        tokens = torch.cat([true, false])[order]
        labels = torch.cat([torch.ones(n_true), torch.zeros(n - n_true)]).long()[order]
        return ParenthesesDataset(tokens, labels)

    def _ood(self, n: int, name: str, exclude: torch.Tensor | None = None) -> torch.Tensor:
        generator = self._generator(name)

        def make() -> torch.Tensor:
            return _by_length(
                n,
                self.even_lengths,
                generator,
                lambda count, length: random_ood_steps(count, length, generator),
                self.max_length,
            )

        tokens = make()
        if exclude is None:
            return tokens
        excluded = {tuple(row) for row in exclude.tolist()}
        kept = [row for row in tokens.tolist() if tuple(row) not in excluded]
        for _ in range(1000):
            if len(kept) >= n:
                break
            kept.extend(row for row in make().tolist() if tuple(row) not in excluded)
        if len(kept) < n:
            raise ValueError(f"could not find {n} OOD probe strings outside the OOD test set")
        return torch.tensor(kept[:n], dtype=torch.long)

    @cached_property
    def train_set(self) -> ParenthesesDataset:
        """Training strings, half TRUE and half FALSE."""
        return self._labelled(self.n_train, "train")

    @cached_property
    def val_set(self) -> ParenthesesDataset:
        """In-distribution validation strings."""
        return self._labelled(self.n_val, "val")

    @cached_property
    def ood_test(self) -> ParenthesesDataset:
        """OOD test strings (equal counts, not nested), labelled 0: accuracy on it is the nested score."""
        tokens = self._ood(self.n_ood_test, "ood_test")
        return ParenthesesDataset(tokens, torch.zeros(tokens.shape[0], dtype=torch.long))

    @cached_property
    def ood_probe_nested(self) -> ParenthesesDataset:
        """Held-out OOD strings (disjoint from ``ood_test``) labelled FALSE, as NESTED answers them."""
        tokens = self._ood(self.n_ood_probe, "ood_probe", exclude=self.ood_test.tokens)
        return ParenthesesDataset(tokens, torch.zeros(tokens.shape[0], dtype=torch.long))

    @cached_property
    def ood_probe_equal(self) -> ParenthesesDataset:
        """The strings of ``ood_probe_nested`` labelled TRUE, as EQUAL-COUNT answers them."""
        return self.ood_probe_nested.relabelled(1)

    @cached_property
    def dyck_probe(self) -> ParenthesesDataset:
        """Held-out Dyck words labelled TRUE (``n_ood_probe`` of them, the OOD lengths): a control probe.

        Its loss rises when a model leans toward answering FALSE everywhere, so holding it fixed while
        lowering ``ood_probe_nested``'s loss asks for rejecting non-nested strings *specifically*.
        """
        tokens = self._dyck_words(self.n_ood_probe, self._generator("dyck_probe"))
        return ParenthesesDataset(tokens, torch.ones(tokens.shape[0], dtype=torch.long))

    @cached_property
    def near_balanced_false_probe(self) -> ParenthesesDataset:
        """Held-out in-distribution FALSE strings with ``|count imbalance| = 2`` and length ``>= 10``
        (``n_ood_probe`` distinct strings, labelled FALSE; none of them a training string): the strings
        that the runs nearest NESTED get wrong on the default data (``validity.py``), a validity control
        probe.

        Drawn as FALSE training strings are (``false_kind``, ``false_close_fraction``) on the lengths
        ``>= 10`` (all FALSE lengths when there are none), and kept by that filter.
        """
        generator = self._generator("near_balanced_false_probe")
        lengths = [n for n in self.false_lengths if n >= 10] or self.false_lengths
        seen = {tuple(row) for row in self.train_set.tokens.tolist()}
        kept: list[list[int]] = []
        for _ in range(1000):
            tokens = self._false_strings(4 * self.n_ood_probe, lengths, generator)
            near = steps_of_tokens(tokens).sum(dim=-1).abs() == 2
            for row in tokens[near].tolist():
                if tuple(row) not in seen:
                    seen.add(tuple(row))
                    kept.append(row)
            if len(kept) >= self.n_ood_probe:
                break
        if len(kept) < self.n_ood_probe:
            raise ValueError(f"n_ood_probe: found fewer than {self.n_ood_probe} near-balanced FALSE strings")
        tokens = torch.tensor(kept[: self.n_ood_probe], dtype=torch.long)
        return ParenthesesDataset(tokens, torch.zeros(tokens.shape[0], dtype=torch.long))

    def setup(self, stage: str | None = None) -> None:
        """Build the sets (they are cached)."""
        _ = self.train_set, self.val_set, self.ood_test

    def loader(self, dataset: ParenthesesDataset, shuffle: bool = False) -> DataLoader:
        """A DataLoader over ``dataset`` with this module's batch size and padding-trimming collate."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_trimmed,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self.loader(self.val_set), self.loader(self.ood_test)]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
