"""jaxbn.flax.nnx against flax.nnx's own layers: same inputs, same weights, same numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn.flax.nnx as jnnx
from jaxbn import testing
from tests.helpers import rand

F32 = jnp.float32


def _functional(layer, **call):
    """The layer as f(params, x) -> y, its batch statistics left as they are."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def f(p, x):
        # Fresh copies of the statistics inside the trace: the update the call makes is dropped.
        return nnx.merge(graphdef, p, jax.tree.map(jnp.array, rest))(x, **call)
    return jax.jit(f), params  # jitted: eager op-by-op dispatch made these tests slow


def _vjps_agree(ours, theirs, x, **tolerances):
    """Outputs and VJPs (random cotangents, w.r.t. the parameters and x) of two layers with the
    same variables, their batch statistics left as they are."""
    (f_ours, params), (f_theirs, _) = _functional(ours), _functional(theirs)
    testing.check_vjp(f_ours, f_theirs, params, x, **tolerances)


def _pair(name, *args, **kwargs):
    return (getattr(nnx, name)(*args, rngs=nnx.Rngs(0), **kwargs),
            getattr(jnnx, name)(*args, rngs=nnx.Rngs(0), **kwargs))


def _random_params(layer, seed):
    """Non-trivial scale and bias, the same for both layers."""
    for i, leaf in enumerate(("scale", "bias")):
        p = getattr(layer, leaf, None)
        if p is not None:
            p[...] = rand(seed + i, p[...].shape, F32, 0.5, 1.0 - i)


@pytest.mark.parametrize("shape, axis", [((64, 12), -1), ((8, 5, 5, 6), -1), ((8, 6, 5, 5), 1)],
                         ids=["dense", "nhwc", "nchw"])
def test_batch_norm_matches_flax_over_steps_train_and_eval(shape, axis):
    flax_bn, ours = _pair("BatchNorm", shape[axis], axis=axis)
    for layer in (flax_bn, ours):
        _random_params(layer, 3)
    for step in range(3):
        x = rand(step, shape, F32, 2.0, 5.0)
        _vjps_agree(ours, flax_bn, x, key=jax.random.key(step), rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(ours(x), flax_bn(x), rtol=1e-5, atol=1e-5)  # updates stats
        for stat in ("mean", "var"):
            np.testing.assert_allclose(getattr(ours, stat)[...], getattr(flax_bn, stat)[...],
                                       rtol=1e-6, atol=1e-6)
    assert not np.allclose(ours.var[...], 1.0)  # the statistics did move
    flax_bn.eval(), ours.eval()
    assert ours.use_running_average is True
    x = rand(9, shape, F32, 2.0, 5.0)
    np.testing.assert_allclose(ours(x), flax_bn(x), rtol=1e-5, atol=1e-5)
    _vjps_agree(ours, flax_bn, x, rtol=1e-5, atol=1e-6)


def test_same_variables_so_checkpoints_load_both_ways():
    flax_bn, ours = _pair("BatchNorm", 6, momentum=0.9)
    assert isinstance(ours, nnx.BatchNorm)
    x = rand(0, (16, 6), F32, 3.0, 1.0)
    flax_bn(x)
    state = nnx.state(flax_bn)
    assert jax.tree.structure(state) == jax.tree.structure(nnx.state(ours))
    nnx.update(ours, state)  # a Flax checkpoint into jaxbn's layer
    ours.eval(), flax_bn.eval()
    np.testing.assert_allclose(ours(x), flax_bn(x), rtol=1e-6, atol=1e-6)
    kinds = {str(path[0]): type(v).__name__ for path, v in nnx.to_flat_state(nnx.state(ours))}
    assert kinds == {"bias": "Param", "mean": "BatchStat", "scale": "Param", "var": "BatchStat"}


def test_use_scale_bias_off_and_bfloat16_input_with_float32_statistics():
    flax_bn, ours = _pair("BatchNorm", 8, use_scale=False, use_bias=False)
    assert ours.scale is None and ours.bias is None
    x = rand(1, (32, 8), F32, 1.0, 300.0)
    x64 = x.astype(jnp.float64)
    truth = (x64 - x64.mean(0)) / jnp.sqrt(x64.var(0) + 1e-5)
    # Offset 300: jaxbn's two-pass variance is exact; Flax's default one-pass E[x^2] - E[x]^2
    # cancels (its use_fast_variance=False is the same math as ours).
    np.testing.assert_allclose(ours(x), truth, atol=1e-4)  # the float32 mean's rounding
    exact_flax = nnx.BatchNorm(8, use_scale=False, use_bias=False, use_fast_variance=False,
                               rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ours(x), exact_flax(x), atol=1e-4)
    # dtype=bfloat16 (mixed precision): the output is bfloat16, the statistics float32.
    flax_bn, ours = _pair("BatchNorm", 8, dtype=jnp.bfloat16)
    xb = rand(2, (256, 8), F32, 1.0, 3.0).astype(jnp.bfloat16)
    y = ours(xb)
    assert y.dtype == flax_bn(xb).dtype == jnp.bfloat16
    assert ours.mean.dtype == jnp.float32
    np.testing.assert_allclose(ours.mean[...], flax_bn.mean[...], rtol=1e-3)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(flax_bn(xb), np.float32),
                               atol=0.05)


def test_mask_statistics_and_valid_outputs_match_flax_masked_out_outputs_are_zero():
    for valid in ((jnp.arange(20) % 3 != 0)[:, None],  # one flag per position, broadcast
                  jax.random.bernoulli(jax.random.key(4), 0.7, (20, 5)).at[:2].set(True)):
        flax_bn, ours = _pair("BatchNorm", 5)  # per entry: each feature its own statistics
        x = rand(3, (20, 5), F32, 2.0, 1.0)
        y_ours, y_flax = ours(x, mask=valid), flax_bn(x, mask=valid)
        entries = np.broadcast_to(np.asarray(valid), x.shape)
        np.testing.assert_allclose(np.asarray(y_ours)[entries], np.asarray(y_flax)[entries],
                                   rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(y_ours)[~entries] == 0)
        for stat in ("mean", "var"):
            np.testing.assert_allclose(getattr(ours, stat)[...], getattr(flax_bn, stat)[...],
                                       rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, shape", [
    (dict(), (6, 10)),
    (dict(reduction_axes=(-2, -1), feature_axes=-1), (4, 3, 10)),
], ids=["last-axis", "two-axes"])
def test_layer_norm_matches_flax(kwargs, shape):
    flax_ln, ours = _pair("LayerNorm", 10, **kwargs)
    for layer in (flax_ln, ours):
        _random_params(layer, 5)
    x = rand(4, shape, F32, 2.0, 3.0)
    _vjps_agree(ours, flax_ln, x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 6, 6, 8), (4, 64)], ids=["nhwc", "dense"])
def test_group_norm_matches_flax(shape):
    flax_gn, ours = _pair("GroupNorm", shape[-1], num_groups=4)
    for layer in (flax_gn, ours):
        _random_params(layer, 7)
    x = rand(6, shape, F32, 2.0, 3.0)
    _vjps_agree(ours, flax_gn, x, rtol=1e-4, atol=1e-5)


def test_dropout_draws_the_same_keys_and_masks_as_flax():
    flax_do = nnx.Dropout(0.3, rngs=nnx.Rngs(dropout=7))
    ours = jnnx.Dropout(0.3, rngs=nnx.Rngs(dropout=7))
    x = rand(0, (40, 30), F32)
    for _ in range(3):  # the key stream advances in step
        y_ours, y_flax = ours(x), flax_do(x)
        np.testing.assert_allclose(y_ours, y_flax, rtol=1e-6)
        assert 0.2 < float(jnp.mean(y_ours == 0)) < 0.4
    key = jax.random.key(3)
    np.testing.assert_allclose(ours(x, rngs=key), flax_do(x, rngs=key), rtol=1e-6)
    ours.eval()
    assert ours(x) is x


def test_ghost_batch_and_backward_options_are_keyword_only_additions():
    ours = jnnx.BatchNorm(4, virtual_batch_size=8, backward="graph", rngs=nnx.Rngs(0))
    x = rand(0, (32, 4), F32, 1.0, 2.0).at[8:16].multiply(10.0)
    y = np.asarray(ours(x)).reshape(4, 8, 4)
    np.testing.assert_allclose(y.mean(axis=1), 0, atol=1e-5)  # each ghost batch normalized
    np.testing.assert_allclose(y.std(axis=1), 1, atol=1e-3)
    plain = jnnx.BatchNorm(4, rngs=nnx.Rngs(0))
    renorm = jnnx.BatchNorm(4, renorm=dict(r_max=1.0, d_max=0.0), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(renorm(x), plain(x), rtol=1e-6, atol=1e-6)  # it is batch norm
    renorm.eval()
    assert renorm.renorm == (("d_max", 0.0), ("r_max", 1.0))  # static, survives train/eval
    with pytest.raises(ValueError, match="backward"):
        jnnx.BatchNorm(4, backward="magic", rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="one feature axis"):
        jnnx.BatchNorm(4, axis=(0, 1), rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="use_running_average"):
        jnnx.BatchNorm(4, use_running_average=None, rngs=nnx.Rngs(0))(x)


def test_synchronized_statistics_under_vmap_with_axis_name_match_flax():
    flax_bn, ours = _pair("BatchNorm", 6, axis_name="devices")
    x = rand(0, (4, 8, 6), F32, 2.0, 1.0)  # 4 "devices", 8 examples each

    def sharded(layer):
        graphdef, params, stats = nnx.split(layer, nnx.Param, nnx.BatchStat)

        def one(x):
            model = nnx.merge(graphdef, params, jax.tree.map(jnp.array, stats))
            y = model(x)
            return y, nnx.state(model, nnx.BatchStat)
        return jax.vmap(one, axis_name="devices", out_axes=(0, None))(x)

    (y_ours, stats_ours), (y_flax, stats_flax) = sharded(ours), sharded(flax_bn)
    np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats_ours["var"][...], stats_flax["var"][...], rtol=1e-6)


class ConvNet(nnx.Module):
    """A small conv net; ``layers`` is the module that provides BatchNorm and Dropout (the one
    line a user changes)."""

    def __init__(self, layers, rngs):
        # No conv bias: batch norm removes it, so its gradient is rounding noise that Adam would
        # blow up to full-size steps, differently in any two implementations.
        self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn = layers.BatchNorm(8, rngs=rngs)
        self.dropout = layers.Dropout(0.25, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        h = self.dropout(nnx.relu(self.bn(self.conv(x))))
        return self.head(h.mean(axis=(1, 2)))


def _train(layers, steps=20):
    model = ConvNet(layers, nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    xs = rand(1, (steps, 16, 8, 8, 3), F32, 1.0, 0.5)
    # Labels the net can learn: which of the first two channels is brighter, and where.
    ys = (2 * (xs[..., 0].mean((2, 3)) > xs[..., 1].mean((2, 3)))
          + (xs[:, :, :4, :, 2].mean((2, 3)) > 0.5))
    losses = [float(step(model, optimizer, x, y)) for x, y in zip(xs, ys)]
    model.eval()
    return np.array(losses), model(xs[0])


def test_swapping_the_import_trains_a_conv_net_to_the_same_losses():
    losses_flax, eval_flax = _train(nnx)
    losses_ours, eval_ours = _train(jnnx)
    np.testing.assert_allclose(losses_ours, losses_flax, rtol=2e-4, atol=2e-5)
    assert losses_ours[-5:].mean() < 0.95 * losses_ours[:5].mean()  # it learned something
    np.testing.assert_allclose(eval_ours, eval_flax, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# NNX's own contracts: dtypes, batches of one, complex input, messages and exception types.


def test_dtypes_follow_nnx_s_promotion():
    """NNX's dtype contract, for the installed Flax: since 0.12 x is promoted with the running
    statistics and the parameters (bfloat16 x without scale and bias computes, and returns,
    float32); before, x was used as given and ``dtype`` applied to the output."""
    x = rand(1, (16, 4), F32, 1.0, 2.0).astype(jnp.bfloat16)
    for options in (dict(use_scale=False, use_bias=False), dict(dtype=jnp.bfloat16), {}):
        flax_bn, ours = _pair("BatchNorm", 4, **options)
        y_ours, y_flax = ours(x), flax_bn(x)
        assert y_ours.dtype == y_flax.dtype
        np.testing.assert_allclose(np.asarray(y_ours, F32), np.asarray(y_flax, F32), atol=2e-2)
        np.testing.assert_allclose(ours.var[...], flax_bn.var[...], rtol=1e-5)
        assert ours.var.dtype == flax_bn.var.dtype


def test_a_batch_of_one_normalizes_to_the_bias_as_nnx():
    flax_bn, ours = _pair("BatchNorm", 4)
    _random_params(flax_bn, 1), _random_params(ours, 1)
    x = rand(2, (1, 4), F32, 1.0, 2.0)
    # dx is 0: NNX's exactly, jaxbn's rules up to rounding of terms of size 1 / sqrt(eps) (atol).
    _vjps_agree(ours, flax_bn, x, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(ours(x), flax_bn(x), atol=1e-6)
    np.testing.assert_allclose(ours.var[...], flax_bn.var[...], rtol=1e-6)


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")  # NNX's own casts
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_complex_input_as_nnx_promotes_and_stores_it():
    """NNX promotes the parameters to complex and assigns the complex running mean to its
    variable (Flax 0.12 keeps the real part in the float32 variable; 0.11 made it complex):
    jaxbn's layer computes the same and assigns it the same way."""
    x = jax.lax.complex(rand(3, (8, 3), F32, 1.0, 1.0), rand(4, (8, 3), F32))
    flax_bn, ours = _pair("BatchNorm", 3, dtype=jnp.complex64)
    _random_params(flax_bn, 5), _random_params(ours, 5)
    y_ours, y_flax = ours(x), flax_bn(x)
    assert y_ours.dtype == y_flax.dtype == jnp.complex64
    np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)
    for stat in ("mean", "var"):
        assert getattr(ours, stat).dtype == getattr(flax_bn, stat).dtype
        np.testing.assert_allclose(getattr(ours, stat)[...], getattr(flax_bn, stat)[...],
                                   rtol=1e-5, atol=1e-6)
    flax_bn.eval(), ours.eval()
    np.testing.assert_allclose(ours(x), flax_bn(x), rtol=1e-5, atol=1e-5)


def test_messages_and_exception_types_are_nnx_s():
    x = rand(5, (8, 4), F32)
    for make, call in [(lambda m: m.Dropout(0.5), lambda layer: layer(x)),
                       (lambda m: m.Dropout(0.5, deterministic=None), lambda layer: layer(x)),
                       (lambda m: m.BatchNorm(4, use_running_average=None, rngs=nnx.Rngs(0)),
                        lambda layer: layer(x)),
                       (lambda m: m.BatchNorm(4, axis_name="batch", rngs=nnx.Rngs(0)),
                        lambda layer: layer(x))]:  # an unbound axis name: JAX's NameError
        errors = []
        for module in (nnx, jnnx):
            with pytest.raises(Exception) as error:
                call(make(module))
            errors.append(error.value)
        assert isinstance(errors[1], type(errors[0])), errors
        if not isinstance(errors[0], NameError):  # Flax's words, which user code matches: its
            # first sentence (the rest of the message changed between Flax 0.11 and 0.12)
            assert str(errors[0]).split("\n")[0].split(". ")[0] in str(errors[1]), errors
    # In eval mode no axis needs to be bound, in NNX as in jaxbn.
    flax_bn, ours = _pair("BatchNorm", 4, axis_name="batch", use_running_average=True)
    np.testing.assert_allclose(ours(x), flax_bn(x), rtol=1e-6)


def test_layer_and_group_norm_over_the_axes_nnx_accepts():
    cases = [("LayerNorm", (4,), dict(reduction_axes=1, feature_axes=1), (2, 4, 3)),
             ("LayerNorm", (5,), dict(reduction_axes=(1, 2), feature_axes=-1), (2, 3, 4, 5)),
             ("GroupNorm", (8,), dict(num_groups=2, reduction_axes=(1, 2, 3)), (2, 3, 2, 8))]
    for name, args, options, shape in cases:
        theirs, ours = _pair(name, *args, **options)
        _random_params(theirs, 6), _random_params(ours, 6)
        _vjps_agree(ours, theirs, rand(7, shape, F32, 2.0, 1.0), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The NNX transforms users wrap layers in, each against the same program on nnx's layers.


def _stack(module, n, x):
    """n BatchNorm layers made by nnx.vmap and run in sequence by nnx.scan (batches of one
    example each inside the vmapped constructor's trace)."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return module.BatchNorm(x.shape[-1], rngs=rngs)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(h, layer):
        return 2.0 * layer(h) + 1.0

    stack = create(nnx.Rngs(0))
    return forward(x, stack), nnx.state(stack, nnx.BatchStat)


def _transformed(module, x, ct):
    results = [_stack(module, 3, x)]
    bn = module.BatchNorm(x.shape[-1], axis_name="b", rngs=nnx.Rngs(0))  # per example, synced
    results.append(nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="b")(bn, x[:, None]))
    results.append(nnx.state(bn, nnx.BatchStat))
    bn = module.BatchNorm(x.shape[-1], rngs=nnx.Rngs(0))
    loss = lambda m, x: jnp.sum(nnx.remat(lambda m, x: m(x))(m, x) * ct)
    results.append(nnx.jit(nnx.grad(loss, argnums=(0, 1)))(bn, x))
    results.append(nnx.state(bn, nnx.BatchStat))
    return results


def test_under_nnx_jit_vmap_scan_and_remat_as_nnx():
    x = rand(8, (6, 3), F32, 2.0, 1.0)
    ct = rand(9, (6, 3), F32)
    for a, b in zip(jax.tree.leaves(_transformed(jnnx, x, ct)),
                    jax.tree.leaves(_transformed(nnx, x, ct))):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_eval_shape_bridge_and_summary_as_nnx():
    from flax import linen
    from flax.nnx import bridge

    import jaxbn.flax.linen as jlinen

    x = rand(10, (4, 3), F32, 2.0, 1.0)
    abstract = nnx.eval_shape(lambda: jnnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    assert isinstance(abstract, jnnx.BatchNorm)
    shapes = lambda layer: [(jax.tree_util.keystr(path), a.shape, a.dtype) for path, a in
                            jax.tree_util.tree_flatten_with_path(nnx.state(layer))[0]]
    assert shapes(abstract) == shapes(nnx.eval_shape(lambda: nnx.BatchNorm(3, rngs=nnx.Rngs(0))))
    assert len(shapes(abstract)) == 4  # scale, bias, mean, var: (3,) float32
    outs = []
    for linen_layers, nnx_layers in ((linen, nnx), (jlinen, jnnx)):
        wrapped = bridge.ToNNX(linen_layers.BatchNorm(use_running_average=False),
                               rngs=nnx.Rngs(0))  # Linen -> NNX
        bridge.lazy_init(wrapped, x)
        y = wrapped(x, mutable=["batch_stats"])

        class Model(linen.Module):  # NNX -> Linen
            @linen.compact
            def __call__(self, x):
                return bridge.ToLinen(nnx_layers.BatchNorm, args=(3,))(x)

        variables = Model().init(jax.random.key(0), x)
        z, updates = Model().apply(variables, 3.0 * x, mutable=["batch_stats"])
        outs.append((y, nnx.state(wrapped, nnx.BatchStat), z, updates))
    for a, b in zip(jax.tree.leaves(outs[1]), jax.tree.leaves(outs[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    table = nnx.tabulate(jnnx.BatchNorm(3, rngs=nnx.Rngs(0)), x)
    assert "BatchNorm" in table and "BatchStat" in table and "Param" in table
