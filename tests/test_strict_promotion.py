"""Strict dtype promotion: every public function of jaxbn (the core, the framework adapters,
jaxbn.nets and jaxbn.cs231n) runs under ``jax.numpy_dtype_promotion("strict")`` for float32,
bfloat16, float16 and float64 inputs, as users who turn it on to find their own bugs (Equinox's
test configuration does) need. A promotion error is raised when a function is traced, so each
call is traced (``jax.eval_shape``: cheap, nothing compiles) with its VJP; the cs231n layers, which
return numpy arrays, run eagerly. A TypePromotionError anywhere fails the matrix with the call's
name. Outputs keep the input dtype where the contract says so."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.equinox as jeqx
import jaxbn.flax.linen as jlinen
import jaxbn.flax.nnx as jnnx
from jaxbn import nets
from jaxbn.cs231n import layers as cs

from helpers import rand

KEY = jax.random.key(0)
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64]


def _vjp(f, *args):
    """``f(*args)`` and its VJP under a cotangent of ones-and-twos (the dtype path, not the
    values, is what strict promotion checks), returning the output."""
    y, pullback = jax.vjp(f, *args)
    pullback(jax.tree.map(lambda a: (jnp.arange(a.size) % 2 + 1).reshape(a.shape).astype(
        a.dtype), y))
    return y


def _core(dtype):
    x, xi = rand(0, (8, 4), dtype, 2.0, 1.0), rand(1, (4, 3, 2, 2), dtype)
    g, b = jnp.ones(4, dtype), jnp.zeros(4, dtype)
    state = jaxbn.init_batch_norm_state(4)

    def bn(**options):
        return lambda: _vjp(lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True,
                                                             **options)[0], x, g, b)

    calls = {f"batch_norm {bw}": bn(backward=bw) for bw in ("alt", "graph", "autodiff")}
    calls.update({
        "batch_norm float32 parameters": lambda: _vjp(lambda x: jaxbn.batch_norm(
            x, jnp.ones(4), None, state, train=True)[0], x),
        "batch_norm mask per position": bn(mask=jnp.arange(8) % 3 != 0),
        "batch_norm mask per entry": bn(mask=jnp.arange(32).reshape(8, 4) % 3 != 0),
        "batch_norm unbiased, cumulative": bn(running_var="unbiased", momentum=None),
        "batch_norm ghost batches": bn(virtual_batch_size=4),
        "batch_norm renorm": bn(renorm=dict(r_max=2.0, d_max=1.0)),
        "batch_norm one value": lambda: jaxbn.batch_norm(x[:1], g, b, state, train=True,
                                                         allow_one_value=True)[0],
        "batch_norm state in x's dtype": lambda: jaxbn.batch_norm(
            x, g, b, jaxbn.init_batch_norm_state(4, dtype), train=True)[0],
        "batch_norm eval": lambda: _vjp(lambda x: jaxbn.batch_norm(x, g, b, state,
                                                                   train=False)[0], x),
        "batch_norm axis_name": lambda: jax.vmap(lambda x: jaxbn.batch_norm(
            x, g, b, state, train=True, axis_name="i")[0], axis_name="i")(x.reshape(2, 4, 4)),
        "spatial_batch_norm": lambda: _vjp(lambda x: jaxbn.spatial_batch_norm(
            x, g[:3], b[:3], jaxbn.init_batch_norm_state(3), train=True)[0], xi),
        "layer_norm": lambda: _vjp(lambda x: jaxbn.layer_norm(x, g, b), x),
        "layer_norm mask": lambda: _vjp(lambda x: jaxbn.layer_norm(x, g, b, mask=x > 0), x),
        "group_norm": lambda: _vjp(lambda x: jaxbn.group_norm(x, None, b[:3], groups=3), xi),
        "dropout": lambda: _vjp(lambda x: jaxbn.dropout(KEY, x, rate=0.3, train=True), x),
        "dropout traced rate": lambda: jax.jit(lambda x, r: jaxbn.dropout(
            KEY, x, rate=r, train=True))(x, jnp.asarray(0.3, dtype)),
        "fold_batch_norm": lambda: jaxbn.fold_batch_norm(jnp.ones((3, 4), dtype), b, g, b,
                                                         state)[0],
    })
    return calls


def _nets(dtype):
    x, xi = rand(2, (8, 4), dtype), rand(3, (4, 3, 4, 4), dtype)
    labels = jnp.arange(8) % 3
    calls = {}
    for norm in (None, "batchnorm", "layernorm"):
        params, state = nets.init_mlp(KEY, 4, [5], 3, normalization=norm, dropout_rate=0.2,
                                      dtype=dtype)
        loss = lambda p, s=state: nets.softmax_cross_entropy(nets.apply_mlp(
            p, s, x, train=True, key=KEY)[0], labels) + nets.l2_penalty(p, 0.1)
        calls[f"mlp {norm}"] = lambda loss=loss, p=params: jax.grad(loss)(p)["W1"]
    conv, conv_state = nets.init_conv_net(KEY, (3, 4, 4), [4], [5], 3, dtype=dtype)
    calls["conv net"] = lambda: nets.apply_conv_net(conv, conv_state, xi, train=True, key=KEY)[0]
    return calls


def _host(dtype):
    """The functions that bring arrays to the host (numpy): they run eagerly."""
    x, xi = rand(4, (8, 4), dtype), rand(5, (4, 3, 2, 2), dtype)
    g, b = jnp.ones(4, dtype), jnp.zeros(4, dtype)
    params, state = nets.init_mlp(KEY, 4, [5], 3, normalization="batchnorm", dtype=dtype)

    def backward(forward, backward, *args):
        out, cache = forward(*args)
        return backward(np.ones_like(out), cache)[0]

    return {
        "recompute_batch_stats": lambda: jaxbn.recompute_batch_stats(
            nets.apply_mlp, params, state, [x, x]).batch_norm[0].mean,
        "cs231n batchnorm": lambda: backward(cs.batchnorm_forward, cs.batchnorm_backward, x, g,
                                             b, {"mode": "train"}),
        "cs231n batchnorm alt": lambda: backward(cs.batchnorm_forward, cs.batchnorm_backward_alt,
                                                 x, g, b, {"mode": "train"}),
        "cs231n spatial batchnorm": lambda: backward(cs.spatial_batchnorm_forward,
                                                     cs.spatial_batchnorm_backward, xi, g[:3],
                                                     b[:3], {"mode": "train"}),
        "cs231n layernorm": lambda: backward(cs.layernorm_forward, cs.layernorm_backward, x, g,
                                             b, {}),
        "cs231n groupnorm": lambda: backward(cs.spatial_groupnorm_forward,
                                             cs.spatial_groupnorm_backward, xi,
                                             g[:3].reshape(1, 3, 1, 1), b[:3].reshape(1, 3, 1, 1),
                                             3, {}),
        "cs231n dropout": lambda: backward(cs.dropout_forward, cs.dropout_backward, x,
                                           {"mode": "train", "p": 0.5, "seed": 0}),
        "cs231n affine, softmax": lambda: cs.softmax_loss(
            backward(cs.affine_forward, cs.affine_backward, x, jnp.ones((4, 3), dtype),
                     jnp.zeros(3, dtype)), np.arange(8) % 4)[0],
    }


def _adapters(dtype):
    x = rand(6, (8, 4), dtype, 2.0, 1.0)
    linen_call = lambda layer, rngs=None, **call: lambda: layer.init_with_output(
        {"params": KEY, "dropout": KEY}, x, **call)[0]

    def equinox_batch_norm():
        norm, state = eqx.nn.make_with_state(jeqx.BatchNorm)(4, "batch", dtype=dtype)
        for inference in (False, True):
            y, state = jax.vmap(lambda x, s: norm(x, s, inference=inference), axis_name="batch",
                                in_axes=(0, None), out_axes=(0, None))(x, state)
        return y

    calls = {}
    for dt in (None, dtype):  # Flax's inferred promotion (mixed dtypes), and a given dtype
        name = "None" if dt is None else jnp.dtype(dt).name
        calls.update({
            f"nnx BatchNorm dtype={name}": lambda dt=dt: jnnx.BatchNorm(
                4, dtype=dt, rngs=nnx.Rngs(0))(x),
            f"nnx LayerNorm dtype={name}": lambda dt=dt: jnnx.LayerNorm(
                4, dtype=dt, rngs=nnx.Rngs(0))(x),
            f"nnx GroupNorm dtype={name}": lambda dt=dt: jnnx.GroupNorm(
                4, num_groups=2, dtype=dt, rngs=nnx.Rngs(0))(x),
            f"linen BatchNorm dtype={name}": linen_call(jlinen.BatchNorm(dtype=dt),
                                                        use_running_average=False),
            f"linen LayerNorm dtype={name}": linen_call(jlinen.LayerNorm(dtype=dt)),
            f"linen GroupNorm dtype={name}": linen_call(jlinen.GroupNorm(num_groups=2,
                                                                         dtype=dt)),
        })
    calls.update({
        "nnx Dropout": lambda: jnnx.Dropout(0.3, rngs=nnx.Rngs(0))(x),
        "linen Dropout": linen_call(jlinen.Dropout(0.3), deterministic=False),
        "equinox BatchNorm": equinox_batch_norm,
        "equinox LayerNorm": lambda: jeqx.LayerNorm(4, dtype=dtype)(x[0]),
        "equinox GroupNorm": lambda: jeqx.GroupNorm(2, 4, dtype=dtype)(x[0][:, None]),
        "equinox Dropout": lambda: jeqx.Dropout(0.3)(x, key=KEY),
    })
    return calls


def _keeps_dtype(name: str, dtype) -> bool:
    """Calls whose output has the input's dtype by contract (the core's, Equinox's, and a Flax
    layer's given ``dtype``)."""
    return (name.startswith(("batch_norm", "spatial", "layer_norm", "group_norm", "dropout",
                             "equinox")) or name.endswith(f"dtype={jnp.dtype(dtype).name}"))


# float32 runs in the test command; the other dtypes (the same functions again) with the slow tests.
@pytest.mark.parametrize(
    "dtype", [pytest.param(d, marks=() if d == jnp.float32 else pytest.mark.slow) for d in DTYPES],
    ids=[jnp.dtype(d).name for d in DTYPES])
def test_every_public_function_runs_under_strict_promotion(dtype):
    traced = {**_core(dtype), **_nets(dtype), **_adapters(dtype)}
    eager = _host(dtype)
    failures = []
    with jax.numpy_dtype_promotion("strict"):
        for name, call in {**traced, **eager}.items():
            try:
                out = call() if name in eager else jax.eval_shape(call)
            except Exception as error:  # noqa: BLE001 - collected, reported below by name
                failures.append(f"{name}: {type(error).__name__}: {str(error)[:200]}")
                continue
            if _keeps_dtype(name, dtype) and jnp.dtype(out.dtype) != jnp.dtype(dtype):
                failures.append(f"{name}: output {out.dtype}, input {jnp.dtype(dtype)}")
    assert not failures, "\n".join(failures)
    assert len(traced) + len(eager) >= 50  # the matrix is what it claims
