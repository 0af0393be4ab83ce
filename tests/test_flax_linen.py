"""jaxbn.flax.linen against flax.linen's own layers: same inputs, same variables, same numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jaxbn.flax.linen as jlinen
from jaxbn import testing
from tests.helpers import rand

F32 = jnp.float32


def _randomized(variables, seed):
    """Non-trivial scale and bias (the same for both layers)."""
    params = dict(variables["params"])
    for i, name in enumerate(("scale", "bias")):
        if name in params:
            params[name] = rand(seed + i, params[name].shape, F32, 0.5, 1.0 - i)
    return {**variables, "params": params}


def _apply(layer, variables, **call):
    """``f(params, x) -> y`` with the other collections fixed (their updates dropped)."""
    rest = {k: v for k, v in variables.items() if k != "params"}

    def f(params, x):
        out = layer.apply({**rest, "params": params}, x, mutable=list(rest), **call)
        return out[0] if rest else out
    return jax.jit(f)  # jitted: eager op-by-op dispatch made these tests slow


@pytest.mark.parametrize("shape, axis", [((64, 12), -1), ((8, 5, 5, 6), -1), ((8, 6, 5, 5), 1)],
                         ids=["dense", "nhwc", "nchw"])
def test_batch_norm_matches_linen_over_steps_train_and_eval(shape, axis):
    flax_bn, ours = nn.BatchNorm(axis=axis), jlinen.BatchNorm(axis=axis)
    x0 = rand(0, shape, F32, 2.0, 5.0)
    variables = _randomized(flax_bn.init(jax.random.key(0), x0, use_running_average=False), 3)
    assert jax.tree.structure(variables) == jax.tree.structure(
        ours.init(jax.random.key(0), x0, use_running_average=False))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)  # init updates nothing
    v_flax = v_ours = variables
    for step in range(3):
        x = rand(step, shape, F32, 2.0, 5.0)
        testing.check_vjp(_apply(ours, v_ours, use_running_average=False),
                          _apply(flax_bn, v_flax, use_running_average=False),
                          v_ours["params"], x, key=jax.random.key(step), rtol=2e-4, atol=2e-5)
        y_ours, upd_ours = ours.apply(v_ours, x, use_running_average=False, mutable=["batch_stats"])
        y_flax, upd_flax = flax_bn.apply(v_flax, x, use_running_average=False,
                                         mutable=["batch_stats"])
        np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)
        v_ours, v_flax = {**v_ours, **upd_ours}, {**v_flax, **upd_flax}
        for stat in ("mean", "var"):
            np.testing.assert_allclose(v_ours["batch_stats"][stat], v_flax["batch_stats"][stat],
                                       rtol=1e-6, atol=1e-6)
    assert not np.allclose(v_ours["batch_stats"]["var"], 1.0)
    x = rand(9, shape, F32, 2.0, 5.0)
    testing.check_vjp(_apply(ours, v_ours, use_running_average=True),
                      _apply(flax_bn, v_ours, use_running_average=True), v_ours["params"], x,
                      rtol=1e-5, atol=1e-6)


def test_layer_and_group_norm_match_linen():
    x = rand(4, (4, 6, 6, 16), F32, 2.0, 3.0)
    for flax_layer, ours in [(nn.LayerNorm(), jlinen.LayerNorm()),
                             (nn.GroupNorm(num_groups=4), jlinen.GroupNorm(num_groups=4)),
                             (nn.GroupNorm(num_groups=None, group_size=8),
                              jlinen.GroupNorm(num_groups=None, group_size=8))]:
        variables = _randomized(flax_layer.init(jax.random.key(0), x), 5)
        testing.check_vjp(_apply(ours, variables), _apply(flax_layer, variables),
                          variables["params"], x, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="group_size must divide"):
        jlinen.GroupNorm(num_groups=None, group_size=5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="trailing axes"):
        jlinen.LayerNorm(reduction_axes=0).init(jax.random.key(0), x)


def test_dropout_uses_the_same_rng_stream_and_mask_as_linen():
    x = rand(0, (40, 30), F32)
    rngs = {"dropout": jax.random.key(5)}
    for flax_do, ours in [(nn.Dropout(0.3), jlinen.Dropout(0.3)),
                          (nn.Dropout(0.5, broadcast_dims=(0,)),
                           jlinen.Dropout(0.5, broadcast_dims=(0,)))]:
        y_flax = flax_do.apply({}, x, deterministic=False, rngs=rngs)
        y_ours = ours.apply({}, x, deterministic=False, rngs=rngs)
        np.testing.assert_allclose(y_ours, y_flax, rtol=1e-6)
        assert 0 < float(jnp.mean(y_ours == 0)) < 1
    np.testing.assert_array_equal(jlinen.Dropout(0.3).apply({}, x, deterministic=True), x)


class ConvNet(nn.Module):
    """``layers`` provides BatchNorm and Dropout: the one line a user changes."""

    layers: object

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)  # no bias before batch norm (see test_flax_nnx)
        x = self.layers.BatchNorm(use_running_average=not train)(x)
        x = self.layers.Dropout(0.25, deterministic=not train)(nn.relu(x))
        return nn.Dense(4)(x.mean(axis=(1, 2)))


def _train(layers, steps=20):
    model = ConvNet(layers)
    xs = rand(1, (steps, 16, 8, 8, 3), F32, 1.0, 0.5)
    ys = 2 * (xs[..., 0].mean((2, 3)) > xs[..., 1].mean((2, 3))) + (xs[..., 2].mean((2, 3)) > 0.5)
    variables = model.init(jax.random.key(0), xs[0], train=False)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(variables["params"])

    @jax.jit
    def step(variables, opt_state, x, y, key):
        def loss_fn(params):
            scores, updates = model.apply({**variables, "params": params}, x, train=True,
                                          mutable=["batch_stats"], rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(scores, y).mean(), updates
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        changes, opt_state = optimizer.update(grads, opt_state)
        params = optax.apply_updates(variables["params"], changes)
        return {**variables, **updates, "params": params}, opt_state, loss

    losses = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        variables, opt_state, loss = step(variables, opt_state, x, y, jax.random.key(100 + i))
        losses.append(float(loss))
    return np.array(losses), model.apply(variables, xs[0], train=False)


def test_swapping_the_import_trains_a_conv_net_to_the_same_losses():
    losses_flax, eval_flax = _train(nn)
    losses_ours, eval_ours = _train(jlinen)
    np.testing.assert_allclose(losses_ours, losses_flax, rtol=2e-4, atol=2e-5)
    assert losses_ours[-5:].mean() < 0.95 * losses_ours[:5].mean()
    np.testing.assert_allclose(eval_ours, eval_flax, rtol=1e-3, atol=1e-4)


def test_axis_name_under_vmap_matches_linen():
    x = rand(0, (4, 8, 6), F32, 2.0, 1.0)
    outs = []
    for layer in (nn.BatchNorm(axis_name="devices"), jlinen.BatchNorm(axis_name="devices")):
        variables = layer.init(jax.random.key(0), x[0], use_running_average=False)
        run = jax.vmap(lambda x: layer.apply(variables, x, use_running_average=False,
                                             mutable=["batch_stats"]),
                       axis_name="devices", out_axes=(0, None))
        outs.append(run(x))
    (y_flax, s_flax), (y_ours, s_ours) = outs
    np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_ours["batch_stats"]["var"], s_flax["batch_stats"]["var"],
                               rtol=1e-6)
