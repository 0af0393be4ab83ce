"""jaxbn.equinox against equinox.nn's own layers (mode="batch"), per-example under vmap."""

from __future__ import annotations

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn.equinox as jeqx
from jaxbn import testing
from tests.helpers import rand

F32 = jnp.float32


def _batched(model, **call):
    """The per-example layer over a batch: ``f(model, x, state) -> (y, state)``."""
    return jax.vmap(lambda m, x, s: m(x, s, **call), axis_name="batch",
                    in_axes=(None, 0, None), out_axes=(0, None))


def _with_params(model, seed):
    weight = rand(seed, model.weight.shape, F32, 0.5, 1.0)
    bias = rand(seed + 1, model.bias.shape, F32, 0.5)
    return eqx.tree_at(lambda m: (m.weight, m.bias), model, (weight, bias))


@pytest.mark.parametrize("shape", [(32, 6), (8, 6, 5, 5)], ids=["dense", "conv"])
def test_batch_norm_matches_equinox_batch_mode_in_training(shape):
    theirs, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(6, "batch", mode="batch")
    ours, state_ours = eqx.nn.make_with_state(jeqx.BatchNorm)(6, "batch")
    theirs, ours = _with_params(theirs, 3), _with_params(ours, 3)
    # An Equinox checkpoint (model and state) loads into jaxbn's layer: the same leaves.
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, (theirs, state))
    buffer.seek(0)
    loaded, _ = eqx.tree_deserialise_leaves(buffer, (ours, state_ours))
    np.testing.assert_array_equal(loaded.weight, theirs.weight)
    for step in range(3):
        x = rand(step, shape, F32, 2.0, 5.0)
        y_fn = lambda m, x: _batched(m)(m, x, state)[0]
        testing.check_vjp(jax.jit(lambda w, x: y_fn(eqx.tree_at(lambda m: (m.weight, m.bias),
                                                                ours, w), x)),
                          jax.jit(lambda w, x: y_fn(eqx.tree_at(lambda m: (m.weight, m.bias),
                                                                theirs, w), x)),
                          (ours.weight, ours.bias), x, key=jax.random.key(step), rtol=2e-4,
                          atol=2e-5)
        y, state = _batched(theirs)(theirs, x, state)
        y_ours, state_ours = _batched(ours)(ours, x, state_ours)
        np.testing.assert_allclose(y_ours, y, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(state_ours), jax.tree.leaves(state)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # the same stored state


def test_inference_reads_the_debiased_running_statistics_not_equinox_flawed_ones():
    momentum = 0.9
    theirs, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, "batch", momentum=momentum,
                                                           mode="batch")
    ours, state_ours = eqx.nn.make_with_state(jeqx.BatchNorm)(4, "batch", momentum=momentum)
    batches = [rand(i, (64, 4), F32, 0.5 + i, 3.0 * i) for i in range(3)]
    for x in batches:
        _, state = _batched(theirs)(theirs, x, state)
        _, state_ours = _batched(ours)(ours, x, state_ours)
    # The running statistics as the normalized exponentially weighted average of the batches,
    # computed here in numpy from the batches alone.
    weights = np.array([momentum ** (2 - k) for k in range(3)]) * (1 - momentum)
    weights /= weights.sum()
    mean = sum(w * np.asarray(x, np.float64).mean(0) for w, x in zip(weights, batches))
    var = sum(w * np.asarray(x, np.float64).var(0) for w, x in zip(weights, batches))
    probe = rand(7, (16, 4), F32, 2.0, 1.0)
    expected = (np.asarray(probe, np.float64) - mean) / np.sqrt(var + 1e-5)
    y_ours, state_after = _batched(ours, inference=True)(ours, probe, state_ours)
    np.testing.assert_allclose(y_ours, expected, rtol=1e-4, atol=1e-4)
    y_theirs, _ = _batched(theirs, inference=True)(theirs, probe, state)
    assert np.max(np.abs(np.asarray(y_theirs) - expected)) > 0.1  # the flaw this fixes
    np.testing.assert_array_equal(jax.tree.leaves(state_after)[0], 3)  # inference: unchanged
    # Before any batch: the initial statistics (0, 1), as Equinox.
    fresh, fresh_state = eqx.nn.make_with_state(jeqx.BatchNorm)(4, "batch")
    y0, _ = _batched(fresh, inference=True)(fresh, probe, fresh_state)
    np.testing.assert_allclose(y0, probe / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_layer_norm_group_norm_and_dropout_match_equinox():
    x = rand(0, (4, 8, 5, 5), F32, 2.0, 3.0)
    for theirs, ours in [(eqx.nn.LayerNorm((8, 5, 5)), jeqx.LayerNorm((8, 5, 5))),
                         (eqx.nn.GroupNorm(4, 8), jeqx.GroupNorm(4, 8))]:
        theirs, ours = _with_params(theirs, 1), _with_params(ours, 1)
        testing.check_vjp(jax.jit(lambda w, x: jax.vmap(eqx.tree_at(lambda m: (m.weight, m.bias),
                                                                    ours, w))(x)),
                          jax.jit(lambda w, x: jax.vmap(eqx.tree_at(lambda m: (m.weight, m.bias),
                                                                    theirs, w))(x)),
                          (ours.weight, ours.bias), x, rtol=1e-4, atol=1e-5)
        y, state = ours(x[0], "state passes through")
        assert state == "state passes through"
    key = jax.random.key(4)
    np.testing.assert_allclose(jeqx.Dropout(0.3)(x, key=key), eqx.nn.Dropout(0.3)(x, key=key),
                               rtol=1e-6)
    assert jeqx.Dropout(0.3)(x, key=key, inference=True) is x
    # p=1: zero outputs with zero (not NaN) gradients.
    g = jax.grad(lambda x: jnp.sum(jeqx.Dropout(1.0)(x, key=key) * x))(x)
    assert np.all(np.asarray(g) == 0)


def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="mode='batch'"):
        jeqx.BatchNorm(4, "batch", mode="ema")
    ours, state = eqx.nn.make_with_state(jeqx.BatchNorm)(4, "batch")
    with pytest.raises(ValueError, match="axis_name 'batch' is not bound"):
        ours(jnp.ones((4,)), state)
    # A whole batch without jax.vmap: the unbound axis name is said first, as Equinox says it
    # (a NameError, as JAX raises), never a complaint about a gamma the user did not pass.
    with pytest.raises(NameError, match="axis_name 'batch' is not bound.*jax.vmap"):
        ours(jnp.ones((32, 4)), state)
    with pytest.raises(ValueError, match=r"takes one example of shape \(4, \.\.\.\); got x of "
                                         r"shape \(32, 4\).*jax\.vmap"):
        jax.vmap(ours, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            jnp.ones((3, 32, 4)), state)
    with pytest.raises(ValueError, match="x.shape == shape"):
        jeqx.LayerNorm(4)(jnp.ones((2, 4)))
    with pytest.raises(RuntimeError, match="requires a key"):
        jeqx.Dropout(0.5)(jnp.ones(3))


class ConvNet(eqx.Module):
    """Per-example conv net; ``layers`` provides BatchNorm and Dropout (the one changed line)."""

    conv: eqx.nn.Conv2d
    bn: eqx.Module
    dropout: eqx.Module
    head: eqx.nn.Linear

    def __init__(self, layers, key):
        k1, k2 = jax.random.split(key)
        # No bias before batch norm (see test_flax_nnx); float32 although the tests enable x64.
        self.conv = eqx.nn.Conv2d(3, 8, 3, use_bias=False, key=k1, dtype=F32)
        self.bn = layers.BatchNorm(8, axis_name="batch", mode="batch", dtype=F32)
        self.dropout = layers.Dropout(0.25)
        self.head = eqx.nn.Linear(8, 4, key=k2, dtype=F32)

    def __call__(self, x, state, key):
        h, state = self.bn(self.conv(x), state)
        h = self.dropout(jax.nn.relu(h), key=key)
        return self.head(h.mean(axis=(1, 2))), state


def _train(layers, steps=20):
    model, state = eqx.nn.make_with_state(ConvNet)(layers, jax.random.key(0))
    xs = rand(1, (steps, 16, 3, 8, 8), F32, 1.0, 0.5)
    ys = 2 * (xs[:, :, 0].mean((2, 3)) > xs[:, :, 1].mean((2, 3))) + (xs[:, :, 2].mean((2, 3))
                                                                      > 0.5)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, opt_state, x, y, key):
        def loss_fn(model, state):
            keys = jax.random.split(key, x.shape[0])
            scores, state = eqx.filter_vmap(model, axis_name="batch",
                                            in_axes=(0, None, 0), out_axes=(0, None))(x, state,
                                                                                      keys)
            return optax.softmax_cross_entropy_with_integer_labels(scores, y).mean(), state
        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state)
        updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(model, updates), state, opt_state, loss

    losses = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        model, state, opt_state, loss = step(model, state, opt_state, x, y, jax.random.key(i))
        losses.append(float(loss))
    inference = eqx.nn.inference_mode(model)
    scores, _ = eqx.filter_vmap(inference, axis_name="batch", in_axes=(0, None, None),
                                out_axes=(0, None))(xs[0], state, None)
    return np.array(losses), scores, state


@pytest.mark.slow
def test_swapping_the_import_trains_a_conv_net_to_the_same_losses():
    class EquinoxLayers:  # eqx.nn with mode="batch", as a user's model would construct it
        BatchNorm = eqx.nn.BatchNorm
        Dropout = eqx.nn.Dropout

    losses_eqx, _, state_eqx = _train(EquinoxLayers)
    losses_ours, scores_ours, state_ours = _train(jeqx)
    np.testing.assert_allclose(losses_ours, losses_eqx, rtol=2e-4, atol=2e-5)
    assert losses_ours[-5:].mean() < 0.95 * losses_ours[:5].mean()
    for a, b in zip(jax.tree.leaves(state_ours), jax.tree.leaves(state_eqx)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(scores_ours))


# ---------------------------------------------------------------------------------------------
# Equinox's own contracts: exception types, batches of one, and its transforms.


def test_unbound_axis_name_raises_equinox_s_exception_and_inference_needs_no_axis():
    x = rand(0, (3, 5), F32)
    errors, outputs = [], []
    for cls, options in ((eqx.nn.BatchNorm, dict(mode="batch")), (jeqx.BatchNorm, {})):
        norm, state = eqx.nn.make_with_state(cls)(5, "batch", **options)
        unnamed = jax.vmap(norm, in_axes=(0, None), out_axes=(0, None))  # no axis_name
        with pytest.raises(NameError) as error:
            unnamed(x, state)
        errors.append(error.value)
        inference = jax.vmap(lambda x, s: norm(x, s, inference=True), in_axes=(0, None),
                             out_axes=(0, None))
        outputs.append(inference(x, state))
    assert isinstance(errors[1], type(errors[0]))
    for a, b in zip(jax.tree.leaves(outputs[1]), jax.tree.leaves(outputs[0])):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_batch_of_one_and_a_group_of_one_value_as_equinox():
    """One example under the named vmap (variance 0: the output is the bias), and group norm
    with one value per group: Equinox computes them, and so does jaxbn's layer."""
    x = rand(1, (1, 4, 3), F32, 1.0, 2.0)
    results = []
    for cls, options in ((eqx.nn.BatchNorm, dict(mode="batch")), (jeqx.BatchNorm, {})):
        norm, state = eqx.nn.make_with_state(cls)(4, "batch", **options)
        norm = _with_params(norm, 2)
        results.append(eqx.filter_jit(_batched(norm))(norm, x, state))
        group = _with_params((eqx.nn if cls is eqx.nn.BatchNorm else jeqx).GroupNorm(4, 4), 3)
        y, pullback = jax.vjp(group, x[0, :, 0])
        results.append((y, pullback(rand(4, (4,), F32))))
    # dx of a batch of one is 0; jaxbn's rules get it up to the rounding of 1 / sqrt(eps) terms.
    for a, b in zip(jax.tree.leaves(results[2:]), jax.tree.leaves(results[:2])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-4)


class _Block(eqx.Module):
    """A Sequential of Linear, BatchNorm, relu, LayerNorm, Dropout and GroupNorm."""

    layers: eqx.nn.Sequential

    def __init__(self, layers, key):
        batch = dict(mode="batch") if layers is eqx.nn else {}
        self.layers = eqx.nn.Sequential([
            eqx.nn.Linear(3, 8, key=key, dtype=F32), layers.BatchNorm(8, "batch", dtype=F32,
                                                                      **batch),
            eqx.nn.Lambda(jax.nn.relu), layers.LayerNorm(8, dtype=F32), layers.Dropout(0.3),
            layers.GroupNorm(2, 8, dtype=F32)])

    def __call__(self, x, state, key):
        return self.layers(x, state, key=key)


def test_sequential_make_with_state_filter_jit_and_filter_vmap_as_equinox():
    x = rand(5, (6, 3), F32, 2.0, 1.0)
    ct = rand(6, (6, 8), F32)
    keys = jax.random.split(jax.random.key(7), 6)
    results = []
    for layers in (eqx.nn, jeqx):
        model, state = eqx.nn.make_with_state(_Block)(layers, jax.random.key(0))

        @eqx.filter_jit
        def step(model, state, x):
            def loss(model):
                y, new = eqx.filter_vmap(model, axis_name="batch", in_axes=(0, None, 0),
                                         out_axes=(0, None))(x, state, keys)
                return jnp.sum(y * ct), new
            return eqx.filter_grad(loss, has_aux=True)(model)

        grads, state = step(model, state, x)
        results.append((eqx.filter(grads, eqx.is_inexact_array), state))
    for a, b in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_statistics_in_float32_where_equinox_loses_the_data(seed):
    """The documented difference: Equinox's BatchNorm computes bfloat16 statistics in bfloat16;
    at offset 30 with std 0.1 its outputs are off by more than 1, jaxbn's by less than 0.01."""
    x = rand(seed, (64, 4), F32, 0.1, 30.0).astype(jnp.bfloat16)
    x64 = np.asarray(x, np.float64)
    truth = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    errors = []
    for cls, options in ((eqx.nn.BatchNorm, dict(mode="batch")), (jeqx.BatchNorm, {})):
        norm, state = eqx.nn.make_with_state(cls)(4, "batch", dtype=jnp.bfloat16, **options)
        y, _ = _batched(norm)(norm, x, state)
        assert y.dtype == jnp.bfloat16
        errors.append(np.max(np.abs(np.asarray(y, np.float64) - truth)))
    assert errors[0] > 1.0 and errors[1] < 0.01, errors
