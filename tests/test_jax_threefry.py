"""The fast dropout's random bits (jax_impl.fast.ops.threefry2x32 and keep_mask) against
references that share no code with them: the published known-answer vectors of Threefry-2x32
(Random123, 20 rounds), a Threefry written here with Python integers from the cipher's
definition, and jax.random's own Threefry kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from jax_impl.fast.ops import keep_mask, threefry2x32

MASK32 = 0xFFFFFFFF
ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)

# (key, counter, output) from Random123's kat_vectors, threefry2x32 with 20 rounds.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


def reference_threefry(key: tuple[int, int], counter: tuple[int, int]) -> tuple[int, int]:
    """Threefry-2x32, 20 rounds (Salmon et al., 2011): a key injection before the first round
    and after every fourth."""
    schedule = (key[0], key[1], key[0] ^ key[1] ^ 0x1BD11BDA)
    x0, x1 = (counter[0] + schedule[0]) & MASK32, (counter[1] + schedule[1]) & MASK32
    for round_index in range(20):
        rotation = ROTATIONS[round_index % 8]
        x0 = (x0 + x1) & MASK32
        x1 = (((x1 << rotation) | (x1 >> (32 - rotation))) & MASK32) ^ x0
        if round_index % 4 == 3:
            injection = round_index // 4 + 1
            x0 = (x0 + schedule[injection % 3]) & MASK32
            x1 = (x1 + schedule[(injection + 1) % 3] + injection) & MASK32
    return x0, x1


@pytest.mark.parametrize("key, counter, expected", KNOWN_ANSWERS)
def test_both_threefry_implementations_give_the_published_answers(key, counter, expected):
    assert reference_threefry(key, counter) == expected
    ours = threefry2x32(tuple(jnp.uint32(k) for k in key), jnp.uint32(counter[0]), jnp.uint32(counter[1]))
    assert (int(ours[0]), int(ours[1])) == expected


def test_threefry_equals_jax_random_kernel_on_many_counters():
    key = np.array([0x9E3779B9, 0x7F4A7C15], np.uint32)
    counters = np.random.default_rng(0).integers(0, 2**32, (2, 1000), dtype=np.uint64).astype(np.uint32)
    expected = threefry_2x32(jnp.asarray(key), jnp.asarray(counters.reshape(-1)))
    ours = jax.jit(threefry2x32)((jnp.uint32(key[0]), jnp.uint32(key[1])), jnp.asarray(counters[0]),
                                 jnp.asarray(counters[1]))
    np.testing.assert_array_equal(np.concatenate([np.asarray(ours[0]), np.asarray(ours[1])]), np.asarray(expected))


@pytest.mark.parametrize("shape", [(3, 5, 4, 2), (3, 5, 3)], ids=["even-size", "odd-size"])
def test_keep_mask_keeps_exactly_where_the_reference_bits_fall_below_the_threshold(shape):
    """keep_mask's contract: element i (row-major) is kept when the first word of Threefry of
    the counter (i, 0) under the key's two words is below round(keep * 2**32). An odd size
    too, since the mask is built in two halves of the counter range."""
    key = jax.random.key(42)
    keep = 0.85
    words = [int(w) for w in jax.random.key_data(key)]
    threshold = round(keep * 2**32)
    expected = np.array([reference_threefry(words, (i, 0))[0] < threshold for i in range(int(np.prod(shape)))])
    mask = np.asarray(keep_mask(key, shape, keep))
    assert mask.shape == shape and mask.dtype == bool
    np.testing.assert_array_equal(mask.reshape(-1), expected)
    assert 0 < expected.sum() < expected.size  # the comparison decided both ways
