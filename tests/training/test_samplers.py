"""P×K identity batches and distillation batches: structure, coverage, determinism, rank shards."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from asymret.errors import DataError
from asymret.training.samplers import DistillationSampler, IdentitySampler, identity_chunks

P, K = 4, 3
# 13 identities with 1..20 images, labels not contiguous and not grouped, so nothing relies on order
SIZES = [1, 2, 3, 4, 5, 6, 7, 9, 11, 12, 15, 17, 20]
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(SIZES)) * 7 + 3, SIZES))


def as_sets(batches) -> list[tuple[int, ...]]:
    return [tuple(b) for b in batches]


def test_every_batch_is_p_identities_times_k_images_of_that_identity():
    batches = list(IdentitySampler(LABELS, P, K, seed=1))
    assert batches
    for batch in batches:
        per_id = Counter(LABELS[batch].tolist())
        assert len(batch) == P * K
        assert len(per_id) == P and set(per_id.values()) == {K}


def test_repeats_only_where_an_identity_has_fewer_than_k_images():
    for batch in IdentitySampler(LABELS, P, K, seed=2):
        for label in set(LABELS[batch].tolist()):
            images = [i for i in batch if LABELS[i] == label]
            n_label = int((LABELS == label).sum())
            assert len(set(images)) == min(K, n_label)  # distinct unless the identity is too small


def test_an_epoch_covers_every_image_and_wastes_little():
    sampler = IdentitySampler(LABELS, P, K, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert set(np.concatenate(batches).tolist()) == set(range(len(LABELS)))
        # each identity needs ceil(n/K) chunks; the final batches may add at most P − 1 filler chunks each
        chunks = sum(-(-n // K) for n in SIZES)
        assert chunks / P <= len(batches) <= chunks / P + P


def test_identity_chunks_pad_small_identities_with_replacement_and_keep_each_image():
    rng = np.random.default_rng(0)
    small = identity_chunks(np.array([10, 11]), 6, rng)
    assert small.shape == (1, 6) and set(small.ravel().tolist()) == {10, 11}
    seven = identity_chunks(np.arange(7), 6, rng)
    assert seven.shape == (2, 6) and set(seven.ravel().tolist()) == set(range(7))
    assert all(len(set(chunk.tolist())) == 6 for chunk in seven)  # the filled chunk repeats no image


def test_same_seed_and_epoch_give_the_same_batches_and_other_epochs_differ():
    a, b = IdentitySampler(LABELS, P, K, seed=5), IdentitySampler(LABELS, P, K, seed=5)
    b.set_epoch(1)
    b.set_epoch(0)  # going back to an epoch reproduces it
    assert as_sets(a) == as_sets(b)
    a.set_epoch(1)
    assert as_sets(a) != as_sets(b)
    assert as_sets(IdentitySampler(LABELS, P, K, seed=6)) != as_sets(b)


def test_rank_shards_are_disjoint_equal_and_partition_the_single_process_epoch():
    world = 3
    whole = as_sets(IdentitySampler(LABELS, P, K, seed=7))
    shards = [as_sets(IdentitySampler(LABELS, P, K, seed=7, rank=r, world_size=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert shards[0] == whole[0:len(shards[0]) * world:world]  # rank r takes batches r, r + world, ...
    positions = [{whole.index(b) for b in s} for s in shards]
    assert set.union(*positions) == set(range(len(whole) // world * world))
    assert sum(len(p) for p in positions) == len(whole) // world * world  # disjoint


def test_too_few_identities_is_a_data_error():
    with pytest.raises(DataError, match="lower ids_per_batch"):
        list(IdentitySampler(LABELS, len(SIZES) + 1, K))


def test_works_as_a_dataloader_batch_sampler():
    sampler = IdentitySampler(LABELS, P, K, seed=0)
    loader = DataLoader(list(range(len(LABELS))), batch_sampler=sampler)
    assert [b.tolist() for b in loader] == list(sampler)


def test_distillation_batches_are_distinct_images_and_one_pass_covers_the_data():
    n, size = 100, 16
    batches = list(DistillationSampler(n, size, seed=0))
    assert len(batches) == n // size
    flat = np.concatenate(batches)
    assert all(len(b) == size for b in batches) and len(set(flat.tolist())) == len(flat) == n // size * size


def test_distillation_num_batches_spans_several_passes_without_repeats_in_a_batch():
    sampler = DistillationSampler(50, 16, num_batches=10, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10
    assert all(len(set(b)) == 16 for b in batches)
    per_pass = 50 // 16
    for start in range(0, 9, per_pass):  # inside one pass no image is seen twice
        seen = np.concatenate(batches[start:start + per_pass])
        assert len(set(seen.tolist())) == len(seen)


def test_distillation_determinism_and_disjoint_rank_shards():
    world = 2
    shards = [list(DistillationSampler(200, 16, seed=3, rank=r, world_size=world)) for r in range(world)]
    assert shards[0] == list(DistillationSampler(200, 16, seed=3, rank=0, world_size=world))
    assert len(shards[0]) == len(shards[1]) == 200 // 16 // world
    assert not set(np.concatenate(shards[0]).tolist()) & set(np.concatenate(shards[1]).tolist())
    other = DistillationSampler(200, 16, seed=3, rank=0, world_size=world)
    other.set_epoch(1)
    assert list(other) != shards[0]


def test_distillation_batch_larger_than_the_data_is_a_data_error():
    with pytest.raises(DataError, match="lower the distillation batch size"):
        DistillationSampler(10, 16)
