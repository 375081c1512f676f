"""Augmentation and normalisation: exactness, determinism, ranges and agreement with PIL."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.batching import plan_epoch
from common.errors import UserFacingError
from common.recipes import SEED, Augmentation
from common.spec import NORMALIZE_MEAN, NORMALIZE_STD
from common.transforms import (
    FILL_INDEX,
    NORMALIZE_TABLE,
    WEIGHT_BITS,
    augment,
    crop_resize_taps,
    draw_augmentation,
    normalize,
    resize_crop,
    rotate,
    rotation_source_index,
)

RNG = np.random.default_rng(1234)
RANDOM_IMAGES = RNG.integers(0, 256, (64, 28, 28), dtype=np.uint8)


def test_identity_without_crop_and_at_angle_zero():
    count = len(RANDOM_IMAGES)
    out = augment(RANDOM_IMAGES, np.zeros(count, bool), rotation_source_index(np.zeros(count)), 22)
    np.testing.assert_array_equal(out, RANDOM_IMAGES)


def test_rotation_by_90_degrees_is_rot90_counter_clockwise():
    out = rotate(RANDOM_IMAGES, rotation_source_index(np.full(len(RANDOM_IMAGES), 90.0)))
    np.testing.assert_array_equal(out, np.rot90(RANDOM_IMAGES, k=1, axes=(1, 2)))


def test_rotation_fills_corners_with_zero():
    out = rotate(np.full((1, 28, 28), 255, np.uint8), rotation_source_index(np.array([45.0])))
    assert out[0, 0, 0] == 0 and out[0, 14, 14] == 255
    assert (rotation_source_index(np.array([45.0])) == FILL_INDEX).any()


def test_rotation_agrees_with_pil_up_to_its_fixed_point_coordinates(synthetic_mnist):
    # PIL's nearest-neighbour affine transform computes source coordinates in fixed point, ours
    # in float64; the floor can differ only where a coordinate lies within PIL's fixed-point
    # resolution of an integer. Check that every disagreement is such a boundary case (within
    # 1e-3 of an integer) and that they are rare (17 of the 501,760 synthetic pixels; 26 of
    # 1,568,000 on 2,000 real images). A CPU's libm may move a float64 coordinate by ~1e-16, which
    # changes a floor only at a boundary that close: the same cases on any CPU.
    images = synthetic_mnist.train_images
    angles = np.random.default_rng(1).uniform(-15, 15, len(images))
    ours = rotate(images, rotation_source_index(angles))
    pil = np.stack([np.asarray(Image.fromarray(im).rotate(a, resample=Image.NEAREST, fillcolor=0))
                    for im, a in zip(images, angles, strict=True)])
    which, rows, cols = np.nonzero(ours != pil)
    assert len(which) <= 1e-4 * ours.size
    theta = np.deg2rad(angles[which])
    dx, dy = cols + 0.5 - 14, rows + 0.5 - 14
    source_x = np.cos(theta) * dx - np.sin(theta) * dy + 14
    source_y = np.sin(theta) * dx + np.cos(theta) * dy + 14
    distance = np.minimum(np.abs(source_x - np.round(source_x)), np.abs(source_y - np.round(source_y)))
    assert (distance < 1e-3).all()


def test_crop_resize_agrees_with_pil_within_one_grey_level(synthetic_mnist):
    # PIL rounds its bilinear weights to its own fixed point (and we to 2**-14), so results may
    # differ by one grey level where the exact value is close to a half; never by more.
    images = synthetic_mnist.train_images[:500]
    pil = np.stack([np.asarray(Image.fromarray(im).crop((3, 3, 25, 25)).resize((28, 28), Image.BILINEAR))
                    for im in images])
    assert np.abs(resize_crop(images, 22).astype(int) - pil).max() <= 1


def test_crop_resize_weights_are_exact_fixed_point():
    index, weight = crop_resize_taps(22)
    assert (weight.sum(axis=1) == 1 << WEIGHT_BITS).all() and (weight >= 0).all()
    flat = np.full((1, 28, 28), 77, np.uint8)
    np.testing.assert_array_equal(resize_crop(flat, 22), flat)  # a flat image stays flat
    rows, cols = np.divmod(index[weight > 0], 28)
    assert rows.min() == 3 and rows.max() == 24 and cols.min() == 3 and cols.max() == 24


def test_same_seed_gives_same_pixels_other_seed_other_pixels(synthetic_mnist):
    def first_batch(seed):
        plan = plan_epoch(seed, 1, len(synthetic_mnist.train_labels), 256, SEED.augmentation)
        return plan.augmented_pixels(synthetic_mnist.train_images, slice(0, 256))

    np.testing.assert_array_equal(first_batch(7), first_batch(7))
    assert not np.array_equal(first_batch(7), first_batch(8))


def test_augmented_values_stay_in_range(synthetic_mnist):
    plan = plan_epoch(0, 1, len(synthetic_mnist.train_labels), 512, SEED.augmentation)
    pixels = plan.augmented_pixels(synthetic_mnist.train_images, slice(0, 512))
    assert pixels.dtype == np.uint8
    inputs = normalize(pixels)
    assert inputs.dtype == np.float32
    assert inputs.min() >= (0 - NORMALIZE_MEAN) / NORMALIZE_STD - 1e-6
    assert inputs.max() <= (1 - NORMALIZE_MEAN) / NORMALIZE_STD + 1e-6
    assert (pixels > 0).mean() == pytest.approx((synthetic_mnist.train_images[:512] > 0).mean(), abs=0.03)


def test_crop_probability_and_angle_range():
    crop, angles, shifts, scales = draw_augmentation(np.random.default_rng(0), 200_000, Augmentation())
    assert not shifts.any() and (scales == 1).all()  # the seed's transforms neither translate nor zoom
    # Binomial standard deviation sqrt(0.1 * 0.9 / 200000) = 0.00067; allow 5 of them.
    assert crop.mean() == pytest.approx(0.1, abs=5 * 0.00067)
    assert angles.min() >= -15 and angles.max() <= 15
    # Uniform on [-15, 15]: mean 0 (sd 15/sqrt(3)/sqrt(n) = 0.019), a quarter below -7.5.
    assert angles.mean() == pytest.approx(0, abs=5 * 0.019)
    assert (angles < -7.5).mean() == pytest.approx(0.25, abs=0.005)


def test_translation_draws_come_last_and_cover_the_range():
    seed_draws = draw_augmentation(np.random.default_rng(0), 10_000, Augmentation())
    crop, angles, shifts, _ = draw_augmentation(np.random.default_rng(0), 10_000, Augmentation(max_translation=2))
    # Drawn after the crops and angles, so adding a translation leaves those draws unchanged.
    np.testing.assert_array_equal(crop, seed_draws[0])
    np.testing.assert_array_equal(angles, seed_draws[1])
    assert shifts.shape == (10_000, 2)
    assert set(np.unique(shifts)) == {-2, -1, 0, 1, 2}
    # Across and down are drawn independently (each pair of the 25 appears about 400 times).
    assert len({tuple(pair) for pair in shifts}) == 25


def test_shift_without_rotation_moves_pixels_right_and_down_with_zero_fill():
    shifts = np.array([[1, 2], [-3, 0]])
    out = rotate(RANDOM_IMAGES[:2], rotation_source_index(np.zeros(2), shifts))
    expected = np.zeros_like(out)
    expected[0, 2:, 1:] = RANDOM_IMAGES[0, :-2, :-1]
    expected[1, :, :-3] = RANDOM_IMAGES[1, :, 3:]
    np.testing.assert_array_equal(out, expected)


def test_shift_follows_rotation_as_in_random_affine():
    # Rotating by 90 degrees and then shifting is the shift of the rotated image.
    shifts = np.array([[2, -1]])
    out = rotate(RANDOM_IMAGES[:1], rotation_source_index(np.array([90.0]), shifts))
    expected = rotate(np.rot90(RANDOM_IMAGES[:1], k=1, axes=(1, 2)).copy(), rotation_source_index(np.zeros(1), shifts))
    np.testing.assert_array_equal(out, expected)


def test_zoom_draws_come_last_and_cover_the_range():
    shifted = draw_augmentation(np.random.default_rng(0), 10_000, Augmentation(max_translation=1))
    zoomed = draw_augmentation(np.random.default_rng(0), 10_000, Augmentation(max_translation=1, max_scale=0.1))
    for before, after in zip(shifted[:3], zoomed[:3], strict=True):  # crops, angles, shifts unchanged
        np.testing.assert_array_equal(before, after)
    assert 0.9 <= zoomed.scales.min() < 0.901 and 1.099 < zoomed.scales.max() <= 1.1
    # Uniform on [0.9, 1.1]: mean 1 (sd 0.2 / sqrt(12) / sqrt(n) = 0.00058), a quarter below 0.95.
    assert zoomed.scales.mean() == pytest.approx(1.0, abs=5 * 0.00058)
    assert (zoomed.scales < 0.95).mean() == pytest.approx(0.25, abs=0.02)
    with pytest.raises(UserFacingError, match="max_scale 1.0"):
        Augmentation(max_scale=1.0)


def test_zoom_by_two_doubles_each_offset_from_the_centre():
    # Output pixel (y, x) copies the source pixel at half its offset from the centre (14, 14).
    out = rotate(RANDOM_IMAGES[:1], rotation_source_index(np.zeros(1), scales=np.array([2.0])))
    rows, cols = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    halfway = np.floor((rows + 0.5 - 14) / 2 + 14).astype(int), np.floor((cols + 0.5 - 14) / 2 + 14).astype(int)
    np.testing.assert_array_equal(out[0], RANDOM_IMAGES[0][halfway])


def pil_affine(image: np.ndarray, angle: float, scale: float, shift: tuple[int, int]) -> np.ndarray:
    """RandomAffine's warp as PIL computes it: Image.transform with the inverse affine map of a
    rotation by `angle` degrees and a zoom by `scale` about the centre, then a shift, sampled at
    pixel centres, nearest neighbour, fill 0."""
    theta, centre = np.deg2rad(angle), 14.0
    cos, sin = np.cos(theta) / scale, np.sin(theta) / scale
    across, down = centre + shift[0], centre + shift[1]
    inverse = (cos, -sin, centre - cos * across + sin * down, sin, cos, centre - sin * across - cos * down)
    return np.asarray(Image.fromarray(image).transform((28, 28), Image.AFFINE, inverse, resample=Image.NEAREST,
                                                       fillcolor=0))


def test_rotation_zoom_and_shift_agree_with_pil_up_to_its_fixed_point_coordinates(synthetic_mnist):
    # As for the rotation alone (above): PIL's fixed-point source coordinates may floor
    # differently from ours only within its resolution of an integer; such pixels are rare.
    images = synthetic_mnist.train_images
    draws = draw_augmentation(np.random.default_rng(2), len(images),
                              Augmentation(max_rotation=15, max_translation=2, max_scale=0.2))
    ours = rotate(images, rotation_source_index(draws.angles, draws.shifts, draws.scales))
    pil = np.stack([pil_affine(image, angle, scale, tuple(shift)) for image, angle, scale, shift
                    in zip(images, draws.angles, draws.scales, draws.shifts, strict=True)])
    differing = ours != pil
    assert differing.mean() <= 1e-4
    which, rows, cols = np.nonzero(differing)
    theta, zoom = np.deg2rad(draws.angles[which]), draws.scales[which]
    dx, dy = cols + 0.5 - 14 - draws.shifts[which, 0], rows + 0.5 - 14 - draws.shifts[which, 1]
    source_x = (np.cos(theta) * dx - np.sin(theta) * dy) / zoom + 14
    source_y = (np.sin(theta) * dx + np.cos(theta) * dy) / zoom + 14
    distance = np.minimum(np.abs(source_x - np.round(source_x)), np.abs(source_y - np.round(source_y)))
    assert (distance < 1e-3).all()


def test_normalize_matches_to_tensor_then_normalize():
    values = np.arange(256, dtype=np.uint8)
    reference = (values.astype(np.float32) / 255 - np.float32(NORMALIZE_MEAN)) / np.float32(NORMALIZE_STD)
    # The table is computed in float64 and rounded once; float32 arithmetic rounds three times,
    # so they differ by at most a couple of float32 ulps (values up to 2.8, ulp 2.4e-7).
    np.testing.assert_allclose(normalize(values), reference, rtol=0, atol=1e-6)
    assert NORMALIZE_TABLE.dtype == np.float32
