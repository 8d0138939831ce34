"""WeightedDistributedSampler: frequencies, shards, mid-epoch weight changes, resume, workers, bad input."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_patterning.data import WeightedDistributedSampler


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chi2_critical(dof: int, z: float = 3.719) -> float:
    """Wilson–Hilferty approximation of the chi-square quantile at normal score ``z`` (1 − 1e-4)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_follows(indices: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit of ``indices`` to ``probs``; zero-probability indices never occur."""
    probs = probs.double() / probs.sum()
    counts = torch.bincount(indices, minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0
    expected = probs * counts.sum()
    positive = probs > 0
    statistic = float(((counts - expected)[positive] ** 2 / expected[positive]).sum())
    assert statistic < chi2_critical(int(positive.sum()) - 1), (statistic, counts.tolist())


def drain(sampler: WeightedDistributedSampler) -> list[int]:
    return list(sampler)


def mean_one(weights: torch.Tensor) -> torch.Tensor:
    """Weights in the unit ``WeightedDistributedSampler.weights`` reports: mean 1 over the entries."""
    return weights.double() / weights.double().mean()


def test_with_replacement_frequencies_follow_per_sample_weights():
    weights = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0.5, 20])
    sampler = WeightedDistributedSampler(list(range(12)), weights, num_replicas=1, rank=0, num_samples=30_000)
    drawn = drain(sampler)
    assert len(drawn) == len(sampler) == 30_000
    assert_follows(torch.tensor(drawn), weights)


def test_group_weight_is_the_group_mass():
    groups = [0] * 2 + [1] * 5 + [2] * 13  # sizes 2, 5, 13
    group_weights = torch.tensor([0.5, 0.3, 0.2])
    sampler = WeightedDistributedSampler(
        list(range(20)),
        group_weights,
        groups=groups,
        num_replicas=1,
        rank=0,
        num_samples=20_000,
        chunk_size=64,
    )
    drawn = torch.tensor(drain(sampler))
    sizes = torch.tensor([2.0, 5, 13])
    per_sample = (group_weights / sizes)[torch.tensor(groups)]
    assert_follows(drawn, per_sample)
    group_share = torch.bincount(torch.tensor(groups)[drawn], minlength=3).double() / len(drawn)
    assert torch.allclose(group_share, group_weights.double(), atol=0.02)
    assert sampler.groups is not None and sampler.groups.tolist() == groups


@pytest.mark.parametrize("initial_mass", ["natural", "equal"])
def test_groups_start_at_their_natural_mass_unless_equal_mass_is_asked_for(initial_mass):
    """Without weights, ``"natural"`` draws every sample equally often (group mass ∝ group size) and
    ``"equal"`` gives every group the same mass; ``weights`` reports them with mean 1 over the groups."""
    groups = [0] * 2 + [1] * 5 + [2] * 13
    sampler = WeightedDistributedSampler(
        list(range(20)), groups=groups, num_replicas=1, rank=0, num_samples=20000, initial_mass=initial_mass
    )
    sizes = torch.tensor([2.0, 5.0, 13.0])
    group_mass = sizes / sizes.sum() if initial_mass == "natural" else torch.full((3,), 1 / 3)
    assert torch.allclose(sampler.weights, 3 * group_mass.double())
    per_sample = (group_mass / sizes)[torch.tensor(groups)]
    assert_follows(torch.tensor(drain(sampler)), per_sample)
    with pytest.raises(ValueError, match="initial_mass"):
        WeightedDistributedSampler(list(range(4)), num_replicas=1, rank=0, initial_mass="uniform")


def test_epochs_differ_repeat_for_the_same_epoch_and_follow_weights_over_many_epochs():
    weights = torch.tensor([1.0, 2, 3, 4, 5, 0, 7, 8])
    sampler = WeightedDistributedSampler(list(range(8)), weights, num_replicas=1, rank=0, chunk_size=3)
    epochs = []
    for epoch in range(400):
        sampler.set_epoch(epoch)
        epochs.append(drain(sampler))
    sampler.set_epoch(7)
    assert drain(sampler) == epochs[7]
    assert epochs[0] != epochs[1]
    assert_follows(torch.tensor(epochs).flatten(), weights)


@pytest.mark.parametrize("groups", [None, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]])
def test_without_replacement_every_positive_weight_sample_once_and_zero_weight_never(groups):
    weights = (
        torch.tensor([1.0, 0, 2, 3, 0, 1, 1, 4, 5, 1]) if groups is None else torch.tensor([1.0, 2, 0, 3])
    )
    n = 10
    positive = [i for i in range(n) if (weights[i] if groups is None else weights[groups[i]]) > 0]
    shards = [
        WeightedDistributedSampler(list(range(n)), weights, groups, num_replicas=2, rank=r, replacement=False)
        for r in range(2)
    ]
    for epoch in range(5):
        drawn = []
        for shard in shards:
            shard.set_epoch(epoch)
            assert len(shard) == math.ceil(len(positive) / 2)
            drawn += drain(shard)
        assert sorted(drawn) == positive  # len(positive) is even: no padding


def test_without_replacement_first_draws_follow_weights():
    weights = torch.tensor([1.0, 2, 3, 4, 0, 6, 7, 8])
    sampler = WeightedDistributedSampler(list(range(8)), weights, num_replicas=1, rank=0, replacement=False)
    firsts = []
    for epoch in range(3000):
        sampler.set_epoch(epoch)
        firsts.append(next(iter(sampler)))
    assert_follows(torch.tensor(firsts), weights)  # P(first = i) = w_i / Σw for Efraimidis–Spirakis


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("replicas", [2, 3])
def test_shards_are_disjoint_positions_of_the_world_size_independent_global_draw(
    replacement, drop_last, replicas
):
    n, weights = 23, torch.rand(23, generator=torch.Generator().manual_seed(1)) + 0.1
    kwargs = dict(weights=weights, seed=5, replacement=replacement, chunk_size=4, drop_last=drop_last)
    single = drain(WeightedDistributedSampler(list(range(n)), num_replicas=1, rank=0, **kwargs))
    shards = [
        drain(WeightedDistributedSampler(list(range(n)), num_replicas=replicas, rank=r, **kwargs))
        for r in range(replicas)
    ]
    per_rank = n // replicas if drop_last else math.ceil(n / replicas)
    assert all(len(shard) == per_rank for shard in shards)
    interleaved = [shards[p % replicas][p // replicas] for p in range(per_rank * replicas)]
    assert interleaved[: min(n, len(interleaved))] == single[: len(interleaved)]  # positions r::R
    if not replacement and not drop_last:  # padding repeats the epoch's first indices
        assert interleaved[n:] == single[: len(interleaved) - n]


@pytest.mark.parametrize("switch_after", [3, 4, 5])
@pytest.mark.parametrize("replicas", [1, 2])
def test_weight_change_takes_effect_within_the_stated_lag(switch_after, replicas):
    chunk_size, batch_size = 8, 4
    lag = math.ceil((chunk_size - 1) / batch_size)
    for rank in range(replicas):
        sampler = WeightedDistributedSampler(
            list(range(16)), num_replicas=replicas, rank=rank, num_samples=400, chunk_size=chunk_size
        )
        batches = []
        for b, batch in enumerate(DataLoader(list(range(16)), batch_size=batch_size, sampler=sampler)):
            batches.append(batch.tolist())
            if b + 1 == switch_after:
                sampler.set_weights(torch.nn.functional.one_hot(torch.tensor(11), 16).float())
        after = [i for batch in batches[switch_after + lag :] for i in batch]
        assert after and set(after) == {11}
        # tight when batch_size divides chunk_size: the lag is chunk_size / batch_size − 1 batches at most
        tight = chunk_size // batch_size - 1
        assert {i for batch in batches[switch_after + tight :] for i in batch} == {11}


def test_weight_change_without_replacement_redraws_the_rest_and_shortens_the_epoch():
    sampler = WeightedDistributedSampler(
        list(range(40)), num_replicas=1, rank=0, replacement=False, chunk_size=8
    )
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(8)]  # exactly one chunk
    sampler.set_weights((torch.arange(40) % 2 == 0).double())  # odd samples now have weight 0
    rest = list(iterator)
    assert all(i % 2 == 0 for i in rest) and not set(rest) & set(head)
    assert sorted(head + rest) == sorted(set(head) | set(range(0, 40, 2)))


def run_with_switches(sampler: WeightedDistributedSampler, switches: dict[int, torch.Tensor], start: int = 0):
    """Iterate one epoch, calling set_weights after ``k`` indices (counted from the epoch's start)."""
    out = []
    for count, index in enumerate(sampler, start=start + 1):
        out.append(index)
        if count in switches:
            sampler.set_weights(switches[count])
    return out


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("cut", [16, 17])
def test_resume_mid_epoch_reproduces_the_remaining_sequence(replacement, replicas, cut):
    n = 60
    switches = {10: torch.rand(n, generator=torch.Generator().manual_seed(2)) + 0.05, 25: torch.ones(n)}
    for rank in range(replicas):

        def make(rank: int = rank) -> WeightedDistributedSampler:
            return WeightedDistributedSampler(
                list(range(n)),
                num_replicas=replicas,
                rank=rank,
                seed=3,
                replacement=replacement,
                chunk_size=8,
            )

        reference = make()
        reference.set_epoch(2)
        full = run_with_switches(reference, switches)
        reference.set_epoch(3)
        next_epoch = drain(reference)

        original = make()
        original.set_epoch(2)
        iterator, seen = iter(original), []
        for count in range(1, cut + 4):  # the DataLoader ran 3 indices ahead of training
            seen.append(next(iterator))
            if count in switches:
                original.set_weights(switches[count])
        state = original.state_dict(consumed=cut)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)

        resumed = make()
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        assert resumed.epoch == 2 and torch.equal(resumed.weights, mean_one(switches[10]))
        rest = run_with_switches(resumed, {k: v for k, v in switches.items() if k > cut}, start=cut)
        assert seen[:cut] + rest == full
        resumed.set_epoch(3)
        assert drain(resumed) == next_epoch


def test_state_after_a_finished_epoch_resumes_at_the_next_epoch():
    sampler = WeightedDistributedSampler(list(range(30)), num_replicas=2, rank=1, chunk_size=4)
    sampler.set_epoch(4)
    drain(sampler)
    sampler.set_weights(torch.arange(30.0) + 1)
    state = sampler.state_dict()
    assert state["epoch"] == 5 and state["position"] == 0
    resumed = WeightedDistributedSampler(list(range(30)), num_replicas=2, rank=1, chunk_size=4)
    resumed.load_state_dict(state)
    sampler.set_epoch(5)
    assert drain(resumed) == drain(sampler)
    assert resumed.version == sampler.version == 1


@pytest.mark.parametrize("replacement", [True, False])
def test_dataloader_with_two_workers_yields_the_sampler_sequence(replacement):
    def make() -> WeightedDistributedSampler:
        return WeightedDistributedSampler(
            list(range(50)),
            torch.arange(50.0) + 1,
            num_replicas=2,
            rank=1,
            replacement=replacement,
            chunk_size=8,
        )

    loader = DataLoader(list(range(50)), batch_size=5, sampler=make(), num_workers=2)
    batches = [batch.tolist() for batch in loader]
    assert [i for batch in batches for i in batch] == drain(make())
    assert len(batches) == len(loader) == 5


def test_dataloader_with_workers_sees_weight_changes_within_lag_plus_prefetch():
    chunk_size, batch_size, workers, prefetch = 8, 4, 2, 2
    sampler = WeightedDistributedSampler(
        list(range(16)), num_replicas=1, rank=0, num_samples=400, chunk_size=8
    )
    loader = DataLoader(
        list(range(16)), batch_size, sampler=sampler, num_workers=workers, prefetch_factor=prefetch
    )
    batches = []
    for b, batch in enumerate(loader):
        batches.append(batch.tolist())
        if b + 1 == 5:
            sampler.set_weights(torch.nn.functional.one_hot(torch.tensor(3), 16).float())
    lag = math.ceil((chunk_size - 1) / batch_size) + workers * prefetch
    assert {i for batch in batches[5 + lag :] for i in batch} == {3}


class NoLength(Dataset):
    def __getitem__(self, index: int) -> int:
        return index


@pytest.mark.parametrize(
    "bad",
    [
        [1.0, float("nan"), 1.0, 1.0],
        [1.0, float("inf"), 1.0, 1.0],
        [1.0, -0.5, 1.0, 1.0],
        [0.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0],
        [[1.0, 1.0], [1.0, 1.0]],
        ["a", "b", "c", "d"],
    ],
)
def test_bad_weights_raise_and_leave_the_weights_unchanged(bad):
    sampler = WeightedDistributedSampler(list(range(4)), [1.0, 2.0, 3.0, 4.0], num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="weights"):
        sampler.set_weights(bad)
    assert sampler.weights.tolist() == [0.4, 0.8, 1.2, 1.6] and sampler.version == 0  # mean 1
    with pytest.raises(ValueError, match="weights"):
        WeightedDistributedSampler(list(range(4)), bad, num_replicas=1, rank=0)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="__len__"):
        WeightedDistributedSampler(NoLength(), num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="groups"):
        WeightedDistributedSampler(list(range(4)), groups=[0, 1, -1, 0], num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="groups"):
        WeightedDistributedSampler(list(range(4)), groups=[0.5, 1, 1, 0], num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="mass"):  # group 1 is empty and holds all the weight
        WeightedDistributedSampler(
            list(range(4)), [0.0, 1.0, 0.0], groups=[0, 0, 2, 2], num_replicas=1, rank=0
        )
    with pytest.raises(ValueError, match="num_samples"):
        WeightedDistributedSampler(list(range(4)), num_replicas=1, rank=0, replacement=False, num_samples=5)
    with pytest.raises(ValueError, match="chunk_size"):
        WeightedDistributedSampler(list(range(4)), num_replicas=1, rank=0, chunk_size=0)
    with pytest.raises(ValueError, match="rank"):
        WeightedDistributedSampler(list(range(4)), num_replicas=2, rank=2)


def test_weights_property_is_a_copy_and_global_rng_is_untouched():
    sampler = WeightedDistributedSampler(list(range(6)), num_replicas=1, rank=0)
    sampler.weights[0] = 100.0
    assert sampler.weights.tolist() == [1.0] * 6
    state = torch.random.get_rng_state()
    drain(sampler)
    assert torch.equal(state, torch.random.get_rng_state())
