"""Dropout: statistics, keys, gradients, limits, broadcasting and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import reference, testing

from helpers import rand

KEYS = {"typed": lambda s: jax.random.key(s), "legacy": lambda s: jax.random.PRNGKey(s)}


def _realized(rate):
    """The documented keep probability: (1 - rate) in steps of 1/256 if exact there, else of
    1/65536 (written from the docstring, not read off the code)."""
    levels = 256 if ((1 - rate) * 256).is_integer() else 65536
    return round((1 - rate) * levels) / levels


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.75, 0.3])
@pytest.mark.parametrize("key_kind", list(KEYS))
def test_drop_fraction_and_mean(rate, key_kind):
    x = jnp.full((200, 500), 3.0, jnp.float32)
    y = jaxbn.dropout(KEYS[key_kind](0), x, rate=rate, train=True)
    n, keep = x.size, _realized(rate)
    assert abs(keep - (1 - rate)) <= 2 ** -17
    frac = float(jnp.mean(y == 0))
    assert abs(frac - (1 - keep)) <= 4 * np.sqrt(keep * (1 - keep) / n)
    # Kept values are scaled by 1 / keep: the mean is preserved within 4 sigma.
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 3.0 / keep], rtol=1e-6)
    sigma = 3.0 * np.sqrt((1 - keep) / keep / n)
    assert abs(float(jnp.mean(y)) - 3.0) <= 4 * sigma


def test_neighbours_sharing_a_random_word_are_independent():
    """Four (or two) elements read one 32-bit word: their keep decisions must not repeat."""
    n = 1 << 18
    for rate in (0.5, 0.3):  # 8 and 16 bits per element
        kept = np.asarray(jaxbn.dropout(jax.random.key(1), jnp.ones((4, n)), rate=rate,
                                        train=True) != 0, np.float64)
        for lag in (1, 2, 3, 4):
            a, b = kept[:, :-lag].ravel(), kept[:, lag:].ravel()
            corr = np.corrcoef(a, b)[0, 1]
            assert abs(corr) < 5 / np.sqrt(a.size), (rate, lag, corr)
        rows = np.corrcoef(kept)[~np.eye(4, dtype=bool)]
        assert np.all(np.abs(rows) < 5 / np.sqrt(n))


def test_test_mode_is_exact_identity_and_accepts_no_key():
    x = rand(0, (4, 5), jnp.float32)
    assert jaxbn.dropout(None, x, rate=0.5, train=False) is x or np.array_equal(
        jaxbn.dropout(None, x, rate=0.5, train=False), x)
    np.testing.assert_array_equal(jaxbn.dropout(jax.random.key(1), x, rate=0.9, train=False), x)


def test_same_key_same_mask_different_key_different_mask():
    x = jnp.ones((64, 64), jnp.float32)
    a = jaxbn.dropout(jax.random.key(3), x, rate=0.5, train=True)
    b = jaxbn.dropout(jax.random.key(3), x, rate=0.5, train=True)
    c = jaxbn.dropout(jax.random.key(4), x, rate=0.5, train=True)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Under jit, the same masks.
    np.testing.assert_array_equal(
        jax.jit(lambda k, x: jaxbn.dropout(k, x, rate=0.5, train=True))(jax.random.key(3), x), a)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64], ids=str)
@pytest.mark.parametrize("key_kind", list(KEYS))
def test_vjp_is_mask_times_scale(dtype, key_kind):
    key = KEYS[key_kind](5)
    x = rand(0, (30, 20), dtype)
    y, pullback = jax.vjp(lambda x: jaxbn.dropout(key, x, rate=0.3, train=True), x)
    dy = rand(1, x.shape, dtype)
    (dx,) = pullback(dy)
    mask = np.asarray(y != 0) | np.asarray(x == 0)
    expected = np.where(mask, np.asarray(dy, np.float64) / _realized(0.3), 0.0)
    assert y.dtype == dtype and dx.dtype == dtype
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(dx, np.float64), expected, rtol=tol, atol=tol)
    # The same mask as the forward: dx / dy == y / x where both are defined.
    np.testing.assert_array_equal(np.asarray(dx) == 0, np.asarray(y) == 0)


def test_mask_is_the_documented_one_and_finite_differences_hold():
    key = jax.random.key(2)
    x = rand(0, (6, 5))
    fn = lambda x: jaxbn.dropout(key, x, rate=0.4, train=True)
    testing.check_finite_differences(jax.jit(fn), x, tol=1e-8)
    # The oracle draws the mask from the docstring's description (a bitcast of the random words
    # where the implementation shifts): the same elements for every rate and shape, including a
    # last axis that the words do not divide, a scalar, and a traced rate (16 bits).
    for rate, shape in [(0.4, (400, 400)), (0.25, (3, 7, 5)), (0.9, (1001,)), (0.5, ())]:
        ones = jnp.ones(shape)
        ref = reference.dropout(key, ones, rate=rate)
        ours = jaxbn.dropout(key, ones, rate=rate, train=True)
        np.testing.assert_array_equal(ours, ref)
        if shape != ():
            assert 0 < float(jnp.mean(ours == 0)) < 1
    traced = jax.jit(lambda r: jaxbn.dropout(key, jnp.ones((50, 30)), rate=r, train=True))
    np.testing.assert_array_equal(traced(0.4), reference.dropout(key, jnp.ones((50, 30)),
                                                                 rate=0.4))
    np.testing.assert_array_equal(traced(0.5) != 0,  # a traced rate takes 16 bits: 0.5 too
                                  _sixteen_bit_mask(key, (50, 30), 0.5))


def _sixteen_bit_mask(key, shape, rate):
    words = np.asarray(jax.random.bits(key, shape[:-1] + (-(-shape[-1] // 2),), jnp.uint32))
    halves = words.view(np.uint16).reshape(shape[:-1] + (-1,))[..., :shape[-1]]
    return halves < round((1 - rate) * 65536)


def test_rate_limits():
    x = rand(0, (8, 8), jnp.float32)
    key = jax.random.key(0)
    np.testing.assert_array_equal(jaxbn.dropout(key, x, rate=0.0, train=True), x)
    g0 = jax.grad(lambda x: jnp.sum(jaxbn.dropout(key, x, rate=0.0, train=True) * x))(x)
    np.testing.assert_allclose(g0, 2 * x, rtol=1e-6)
    y1, pullback = jax.vjp(lambda x: jaxbn.dropout(key, x, rate=1.0, train=True), x)
    (g1,) = pullback(jnp.ones_like(x))
    assert np.all(np.asarray(y1) == 0) and np.all(np.asarray(g1) == 0)
    assert np.all(np.isfinite(g1))
    # Near 1: finite, large scale.
    y9 = jaxbn.dropout(key, jnp.ones((100, 100)), rate=0.999, train=True)
    assert np.all(np.isfinite(y9)) and float(jnp.max(y9)) == pytest.approx(1 / _realized(0.999),
                                                                            rel=1e-6)


def test_broadcast_dims_share_the_mask():
    x = jnp.ones((4, 16, 5, 6), jnp.float32)
    y = jaxbn.dropout(jax.random.key(0), x, rate=0.5, train=True, broadcast_dims=(2, 3))
    y = np.asarray(y)
    assert np.all(y == y[:, :, :1, :1])  # one value per (example, channel)
    per_channel = y[:, :, 0, 0]
    assert 0 < np.mean(per_channel == 0) < 1
    # Negative dims mean the same axes.
    y_neg = jaxbn.dropout(jax.random.key(0), x, rate=0.5, train=True, broadcast_dims=(-1, -2))
    np.testing.assert_array_equal(y_neg, y)


def test_vmap_over_keys_gives_independent_masks():
    keys = jax.random.split(jax.random.key(0), 8)
    legacy = jax.random.split(jax.random.PRNGKey(0), 8)
    x = jnp.ones((32, 32), jnp.float32)
    for ks in (keys, legacy):
        ys = jax.vmap(lambda k: jaxbn.dropout(k, x, rate=0.5, train=True))(ks)
        masks = np.asarray(ys != 0).reshape(8, -1)
        for i in range(8):
            np.testing.assert_array_equal(
                masks[i], np.asarray(jaxbn.dropout(ks[i], x, rate=0.5, train=True) != 0).ravel())
        agreement = (masks[:, None] == masks[None]).mean(-1)[~np.eye(8, dtype=bool)]
        assert np.all(np.abs(agreement - 0.5) < 0.1)
        grads = jax.vmap(jax.grad(lambda x, k: jnp.sum(jaxbn.dropout(k, x, rate=0.5, train=True))),
                         in_axes=(None, 0))(x, ks)
        np.testing.assert_array_equal(np.asarray(grads != 0), np.asarray(ys != 0))


@pytest.mark.parametrize("broadcast_dims", [(), (1,)])
def test_residual_holds_nothing_the_size_of_x(broadcast_dims):
    """jaxbn.dropout draws the mask again in the backward: the residual is the key, the
    threshold and the scale; the adapters' bernoulli draw keeps 1 bit per element."""
    from jaxbn._dropout import bernoulli_dropout

    x = jnp.ones((256, 200), jnp.float32)
    key = jax.random.key(0)
    mask_elements = x.size if not broadcast_dims else x.shape[0]
    for fn, limit in ((lambda x: jaxbn.dropout(key, x, rate=0.5, train=True,
                                               broadcast_dims=broadcast_dims), 64),
                      (lambda x: bernoulli_dropout(key, x, rate=0.5,
                                                   broadcast_dims=broadcast_dims),
                       mask_elements / 8 + 64)):
        _, pullback = jax.vjp(fn, x)
        arrays = [leaf for leaf in jax.tree.leaves(pullback) if hasattr(leaf, "nbytes")]
        assert sum(a.nbytes for a in arrays) <= limit


BAD = [
    ("rate-negative", dict(rate=-0.1), ValueError, "rate"),
    ("rate-above-1", dict(rate=1.5), ValueError, "rate"),
    ("rate-string", dict(rate="0.5"), TypeError, "rate"),
    ("key-missing", dict(key=None), TypeError, "key must be a PRNG key"),
    ("key-int", dict(key=3), TypeError, "key must be a PRNG key"),
    ("key-float-array", dict(key=np.zeros(2, np.float32)), TypeError, "key must be a PRNG key"),
    ("key-batch", dict(key=jax.random.split(jax.random.key(0), 2)), ValueError, "single PRNG key"),
    ("broadcast-out-of-range", dict(broadcast_dims=(2,)), ValueError, "broadcast_dims"),
    ("broadcast-not-int", dict(broadcast_dims=(0.5,)), TypeError, "broadcast_dims"),
    ("train-string", dict(train="train"), TypeError, "train must be a Python bool"),
    ("x-bool", dict(x=np.ones((2, 3), bool)), TypeError,
     "x must be a floating .* or integer array; got dtype bool"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("override,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(override, error, match, jit):
    args = {"key": jax.random.key(0), "x": np.ones((2, 3), np.float32), "rate": 0.5,
            "train": True, "broadcast_dims": (), **override}
    key, x = args.pop("key"), args.pop("x")
    call = lambda x: jaxbn.dropout(key, x, **args)
    if jit:
        call = jax.jit(call)
    with pytest.raises(error, match=match):
        call(x)
