"""jaxbn.nets: shapes, modes, composition with jit/vmap/grad, gradients against autodiff."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from jaxbn import nets, testing

from helpers import rand

# Jitted once for every case: eager op-by-op dispatch made these tests slow.
_apply_mlp = jax.jit(nets.apply_mlp, static_argnames=("train",))
_apply_conv_net = jax.jit(nets.apply_conv_net, static_argnames=("train",))


@pytest.mark.parametrize("normalization", [None, "batchnorm", "layernorm"])
def test_mlp_layout_and_test_mode_is_deterministic(normalization):
    params, state = nets.init_mlp(jax.random.key(0), 12, [8, 6], 4, normalization=normalization,
                                  dropout_rate=0.5)
    expected = {"W1", "b1", "W2", "b2", "W3", "b3"}
    if normalization:
        expected |= {"gamma1", "beta1", "gamma2", "beta2"}
    assert set(params) == expected and params["W1"].shape == (12, 8)
    assert len(state.batch_norm) == (2 if normalization == "batchnorm" else 0)
    x = rand(0, (5, 3, 4), jnp.float32)  # flattened to (5, 12)
    a, s1 = _apply_mlp(params, state, x, train=False, key=jax.random.key(1))
    b, s2 = _apply_mlp(params, state, x, train=False, key=jax.random.key(2))
    c, _ = _apply_mlp(params, state, x, train=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert a.shape == (5, 4)
    for u, v in zip(jax.tree.leaves(s1), jax.tree.leaves(state)):
        np.testing.assert_array_equal(u, v)  # test mode leaves the running statistics alone
    t1, _ = _apply_mlp(params, state, x, train=True, key=jax.random.key(1))
    t2, _ = _apply_mlp(params, state, x, train=True, key=jax.random.key(2))
    assert not np.array_equal(t1, t2)  # dropout in train mode depends on the key


def test_mlp_equals_layers_composed_by_hand_and_gradients_match_autodiff():
    params, state = nets.init_mlp(jax.random.key(0), 6, [5], 3, normalization="batchnorm",
                                  dtype=jnp.float64)
    x = rand(1, (7, 6))
    y = jnp.array([0, 1, 2, 0, 1, 2, 0])

    def by_hand(params, backward):
        h = x @ params["W1"] + params["b1"]
        h, _ = jaxbn.batch_norm(h, params["gamma1"], params["beta1"], state.batch_norm[0],
                                train=True, backward=backward)
        scores = jax.nn.relu(h) @ params["W2"] + params["b2"]
        return nets.softmax_cross_entropy(scores, y) + nets.l2_penalty(params, 0.3)

    def ours(params):
        scores, _ = nets.apply_mlp(params, state, x, train=True)
        return nets.softmax_cross_entropy(scores, y) + nets.l2_penalty(params, 0.3)

    assert abs(float(jax.jit(ours)(params)) - float(jax.jit(by_hand, static_argnums=1)(
        params, "alt"))) <= 1e-14
    # b1 feeds batch norm, so its gradient is exactly 0: an absolute floor.
    testing.check_vjp(ours, lambda p: by_hand(p, "autodiff"), params, rtol=1e-10, atol=1e-14)
    assert np.max(np.abs(jax.jit(jax.grad(ours))(params)["W1"])) > 1e-3


def test_l2_penalty_covers_weights_only():
    params = {"W1": jnp.full((2, 2), 2.0), "b1": jnp.full(2, 5.0), "gamma1": jnp.full(2, 3.0),
              "conv1_W": jnp.ones((1, 1, 2, 2))}
    assert float(nets.l2_penalty(params, 0.5)) == pytest.approx(0.5 * 0.5 * (16 + 4))


@pytest.mark.slow
@pytest.mark.parametrize("normalization", [None, "batchnorm", "layernorm"])
def test_conv_net_shapes_state_and_gradients(normalization):
    params, state = nets.init_conv_net(jax.random.key(0), (1, 4, 4), (2, 3), (5,), 5,
                                       normalization=normalization, dtype=jnp.float64)
    assert params["conv1_W"].shape == (2, 1, 3, 3) and params["W1"].shape == (3 * 1 * 1, 5)
    x = rand(1, (3, 1, 4, 4))
    scores, new = _apply_conv_net(params, state, x, train=True)
    assert scores.shape == (3, 5)
    assert len(new.batch_norm) == (3 if normalization == "batchnorm" else 0)
    if normalization == "batchnorm":
        assert new.batch_norm[0].mean.shape == (2,) and new.batch_norm[2].mean.shape == (5,)
        assert not np.allclose(new.batch_norm[0].mean, 0.0)
    loss = lambda p: jnp.sum(nets.apply_conv_net(p, state, x, train=True)[0] * rand(2, (3, 5)))
    # Finite differences can straddle a relu or max-pool kink: 1e-4, not float64's usual 1e-6.
    check_grads(jax.jit(loss), (params,), order=1, modes=["rev"], atol=1e-4, rtol=1e-4)


def test_jit_and_vmap_over_stacked_models():
    keys = jax.random.split(jax.random.key(0), 3)
    init = lambda k: nets.init_mlp(k, 6, [5], 3, normalization="batchnorm")
    params, state = jax.vmap(init)(keys)
    x = rand(1, (8, 6), jnp.float32)
    stacked, _ = jax.jit(jax.vmap(lambda p, s: nets.apply_mlp(p, s, x, train=True)))(params, state)
    for i in range(3):
        p_i, s_i = jax.jit(init)(keys[i])
        np.testing.assert_allclose(stacked[i], _apply_mlp(p_i, s_i, x, train=True)[0],
                                   rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="normalization"):
        nets.init_mlp(jax.random.key(0), 4, [3], 2, normalization="batch")
    with pytest.raises(ValueError, match="hidden_dims"):
        nets.init_mlp(jax.random.key(0), 4, [3, 0], 2)
    with pytest.raises(ValueError, match="dropout_rate"):
        nets.init_mlp(jax.random.key(0), 4, [3], 2, dropout_rate=1.0)
    params, state = nets.init_mlp(jax.random.key(0), 4, [3], 2, dropout_rate=0.5)
    with pytest.raises(ValueError, match="x must have 4 features"):
        nets.apply_mlp(params, state, jnp.ones((2, 5)), train=False)
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        nets.apply_mlp(params, state, jnp.ones((2, 4)), train=True)
    with pytest.raises(TypeError, match="train"):
        nets.apply_mlp(params, state, jnp.ones((2, 4)), train="train")
    with pytest.raises(ValueError, match="too small"):
        nets.init_conv_net(jax.random.key(0), (1, 2, 2), (4, 4))
    with pytest.raises(ValueError, match=r"params must hold W1, W2"):
        nets.apply_mlp({}, state, jnp.ones((2, 4)), train=False)


def test_apply_is_pure_and_changes_nothing_it_is_given():
    params, state = nets.init_conv_net(jax.random.key(0), (1, 8, 8), (4,), (6,), 3,
                                       normalization="batchnorm")
    before = jax.tree.map(np.array, (params, state))
    x = rand(0, (5, 1, 8, 8), jnp.float32)
    _, new = nets.apply_conv_net(params, state, x, train=True)
    assert jax.tree.all(jax.tree.map(np.array_equal, before, (params, state)))
    assert len(new.batch_norm) == 2 and not np.allclose(new.batch_norm[0].mean, 0)
    assert dataclasses.replace(state, batch_norm=new.batch_norm) == new


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "conv"])
def test_backward_reaches_every_normalization_of_a_net(conv):
    """``backward=`` is a static field of the state: with "autodiff" forward-mode jax.jvp runs
    through the whole net (the hand-written rules are reverse-mode only, and say so)."""
    key = jax.random.key(0)
    for normalization in ("batchnorm", "layernorm"):
        if conv:
            make = lambda b: nets.init_conv_net(key, (1, 4, 4), (2,), (5,), 3,
                                                normalization=normalization, backward=b)
            x, apply = rand(1, (6, 1, 4, 4), jnp.float32), nets.apply_conv_net
        else:
            make = lambda b: nets.init_mlp(key, 4, [5, 5], 3, normalization=normalization,
                                           backward=b)
            x, apply = rand(1, (6, 4), jnp.float32), nets.apply_mlp
        params, state = make("autodiff")
        assert state.backward == "autodiff"
        f = lambda x: apply(params, state, x, train=True)[0]
        _, tangent = jax.jit(lambda x: jax.jvp(f, (x,), (jnp.ones_like(x),)))(x)
        assert bool(jnp.all(jnp.isfinite(tangent))) and float(jnp.max(jnp.abs(tangent))) > 0
        params, state = make("alt")
        with pytest.raises(TypeError, match="backward='autodiff'"):
            jax.jvp(lambda x: apply(params, state, x, train=True)[0], (x,), (jnp.ones_like(x),))
    with pytest.raises(ValueError, match="backward must be one of"):
        nets.init_mlp(key, 4, [5], 3, backward="numpy")
