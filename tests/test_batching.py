"""The seeded per-epoch plan: deterministic for a seed, different across epochs and seeds."""

from __future__ import annotations

import numpy as np
import pytest

from common.batching import check_even_shards, plan_epoch, train_batches
from common.errors import UserFacingError
from common.recipes import SEED

AUG = SEED.augmentation


def test_same_seed_and_epoch_give_the_same_plan():
    first, second = plan_epoch(3, 2, 60000, 256, AUG), plan_epoch(3, 2, 60000, 256, AUG)
    np.testing.assert_array_equal(first.order, second.order)
    np.testing.assert_array_equal(first.crop, second.crop)
    np.testing.assert_array_equal(first.angles, second.angles)


def test_order_differs_between_epochs_and_seeds():
    base = plan_epoch(3, 1, 60000, 256, AUG).order
    assert not np.array_equal(base, plan_epoch(3, 2, 60000, 256, AUG).order)
    assert not np.array_equal(base, plan_epoch(4, 1, 60000, 256, AUG).order)


def test_order_is_a_permutation_and_batches_cover_it():
    plan = plan_epoch(0, 1, 1000, 256, AUG)
    np.testing.assert_array_equal(np.sort(plan.order), np.arange(1000))
    slices = plan.batch_slices()
    assert [s.stop - s.start for s in slices] == [256, 256, 256, 232]


def test_head_keeps_a_prefix():
    plan = plan_epoch(0, 1, 1000, 256, AUG)
    head = plan.head(300)
    np.testing.assert_array_equal(head.order, plan.order[:300])
    assert len(head.batch_slices()) == 2


def test_train_batches_follow_the_plan():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (600, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 600)
    plan = plan_epoch(5, 1, 600, 256, AUG)
    batches = list(train_batches(plan, images, labels))
    assert [len(b.labels) for b in batches] == [256, 256, 88]
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), labels[plan.order])
    assert batches[0].images.shape == (256, 28, 28) and batches[0].images.dtype == np.float32
    assert batches[0].labels.dtype == np.int64


def test_shards_cut_every_batch_into_equal_consecutive_parts():
    plan = plan_epoch(0, 1, 1000, 256, AUG)  # batches of 256, 256, 256 and 232
    shards = [plan.shard(index, 4) for index in range(4)]
    assert [[s.stop - s.start for s in shard.batch_slices()] for shard in shards] == [[64, 64, 64, 58]] * 4
    for whole, *parts in zip(plan.batch_slices(), *(shard.batch_slices() for shard in shards), strict=True):
        for field in ("order", "crop", "angles", "shifts"):
            joined = np.concatenate([getattr(shard, field)[part] for shard, part in zip(shards, parts, strict=True)])
            np.testing.assert_array_equal(joined, getattr(plan, field)[whole])


def test_a_batch_that_does_not_split_evenly_is_refused_with_the_sizes():
    with pytest.raises(UserFacingError, match="batch size 256 and the epoch's last batch of 232 images cannot be cut "
                                              "into 3 equal parts"):
        plan_epoch(0, 1, 1000, 256, AUG).shard(0, 3)
    with pytest.raises(UserFacingError, match="--devices 16: .*, but the epoch.s last batch of 232 images cannot"):
        plan_epoch(0, 1, 1000, 256, AUG).shard(0, 16)


def test_uneven_shards_name_the_batch_that_cannot_be_cut():
    with pytest.raises(UserFacingError, match="--devices 4: .*the epoch's last batch of 26 images cannot be cut"):
        check_even_shards(32, 90, 4)
    with pytest.raises(UserFacingError, match="but batch size 30 cannot be cut into 4 equal parts"):
        check_even_shards(30, 120, 4)
    check_even_shards(32, 128, 4)  # even: nothing to refuse
