"""Checks that need 8 devices; run by tests/test_distributed.py in a subprocess, because the
device count must be set before JAX starts. Exits non-zero (with a message) on any failure."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

jax.config.update("jax_enable_x64", True)

import jaxbn  # noqa: E402
from jaxbn import reference  # noqa: E402

assert jax.device_count() == 8, jax.device_count()
MESH = jax.make_mesh((8,), ("data",))


def sharded(a):
    return jax.device_put(a, NamedSharding(MESH, P("data")))


def close(a, b, tol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def compare(layout, dtype, offset, tol, masked=False, backward="alt", padding=None):
    shape = {"flat": (64, 5), "NCHW": (16, 3, 4, 4), "NHWC": (16, 4, 4, 3)}[layout]
    axis = {"flat": 1, "NCHW": 1, "NHWC": 3}[layout]
    d = shape[axis]
    x = (jax.random.normal(jax.random.key(0), shape, jnp.float64) * 2 + offset).astype(dtype)
    dy = jax.random.normal(jax.random.key(1), shape, jnp.float64).astype(dtype)
    gamma = jnp.linspace(0.5, 2.0, d).astype(dtype)
    beta = jnp.linspace(-1.0, 1.0, d).astype(dtype)
    state = jaxbn.init_batch_norm_state(d, jnp.float64 if dtype == jnp.float64 else jnp.float32)
    mask_shape = tuple(n for a, n in enumerate(shape) if a != axis)
    # Uneven valid counts per device: device i keeps a different share of its slice.
    mask = (jax.random.uniform(jax.random.key(2), mask_shape)
            < jnp.repeat(jnp.linspace(0.2, 0.9, 8), shape[0] // 8).reshape(
                (-1,) + (1,) * (len(mask_shape) - 1))) if masked else None

    def call(x, g, b, m, axis_name):
        kw = dict(train=True, backward=backward, axis_name=axis_name, mask=m)
        if layout == "flat":
            return jaxbn.batch_norm(x, g, b, state, **kw)
        return jaxbn.spatial_batch_norm(x, g, b, state, layout=layout, **kw)

    def loss(fn):
        def inner(x, g, b, m):
            y, new = fn(x, g, b, m)
            return jnp.sum(y.astype(jnp.float64) * dy), (y, new)
        return jax.value_and_grad(inner, argnums=(0, 1, 2), has_aux=True)

    smap = jax.shard_map(lambda x, g, b, m: call(x, g, b, m, "data"), mesh=MESH,
                         in_specs=(P("data"), P(), P(), P("data") if masked else P()),
                         out_specs=(P("data"), P()))
    x8 = x
    if padding is not None:  # the sharded run sees NaN/inf padding, the one-device run does not
        x8 = jnp.where(jnp.expand_dims(mask, axis), x, padding).astype(dtype)
    (_, (y8, s8)), g8 = jax.jit(loss(smap))(sharded(x8), gamma, beta,
                                            sharded(mask) if masked else None)
    # Jitted too: eager op-by-op dispatch of the one-device run made this script slow.
    (_, (y1, s1)), g1 = jax.jit(loss(lambda x, g, b, m: call(x, g, b, m, None)))(x, gamma, beta,
                                                                                mask)
    what = f"{layout} {jnp.dtype(dtype).name} offset {offset} masked={masked} {backward}"
    close(y8, y1, tol, what + " y")
    for name, a, b in zip(("dx", "dgamma", "dbeta"), g8, g1):
        close(a, b, tol, what + " " + name)
    for name, a, b in zip(("running mean", "running var"), s8, s1):
        close(a, b, tol, what + " " + name)
    if masked:  # statistics of the valid subset, computed directly
        valid = np.moveaxis(np.asarray(x, np.float64), axis, -1)[np.asarray(mask)]
        close(s1.mean, 0.1 * valid.mean(0), tol, what + " masked mean")
        close(s1.var, 0.9 + 0.1 * valid.var(0), tol, what + " masked var")
    return y8


for layout in ("flat", "NCHW", "NHWC"):
    compare(layout, jnp.float64, 0.0, 1e-12)
    compare(layout, jnp.float64, 3.0, 1e-12, masked=True)
compare("flat", jnp.float64, 0.0, 1e-12, backward="autodiff")
compare("NHWC", jnp.float64, 3.0, 1e-12, masked=True, padding=jnp.nan)
compare("flat", jnp.float64, 3.0, 1e-12, masked=True, padding=jnp.inf, backward="autodiff")
compare("NCHW", jnp.float32, 3.0, 1e-5, masked=True, padding=1e30)
try:  # the staged rule needs the whole batch in one place: refused, not swapped
    compare("flat", jnp.float64, 0.0, 1e-12, backward="graph")
except ValueError as e:
    assert "backward='graph' is not available" in str(e), e
else:
    raise AssertionError("backward='graph' under axis_name ran another rule silently")

# Large common offset in float32, across devices: the variance must not cancel.
y = compare("flat", jnp.float32, 1e4, 1e-3)
std = np.asarray(y, np.float64).std(0) / np.linspace(0.5, 2.0, 5)
assert np.all(np.abs(std - 1.0) <= 1e-3), std

# The masked multi-device gradient against autodiff of the naive masked forward.
x = jax.random.normal(jax.random.key(3), (32, 4), jnp.float64) + 2.0
mask = jnp.arange(32) % 3 != 0
dy = jax.random.normal(jax.random.key(4), (32, 4), jnp.float64)
g, b = jnp.array([1.0, 2.0, 0.5, 1.5]), jnp.zeros(4)
state = jaxbn.init_batch_norm_state(4, jnp.float64)
smap = jax.shard_map(lambda x, g, b, m: jaxbn.batch_norm(x, g, b, state, train=True,
                                                         axis_name="data", mask=m)[0],
                     mesh=MESH, in_specs=(P("data"), P(), P(), P("data")), out_specs=P("data"))
grads = jax.jit(jax.grad(lambda x, g, b: jnp.sum(smap(x, g, b, sharded(mask)) * dy),
                         argnums=(0, 1, 2)))(sharded(x), g, b)
naive = lambda x, g, b: jnp.sum(reference.normalize(x, g[None], b[None], (0,), 1e-5, None,
                                                    mask[:, None])[0] * dy)
for a, r in zip(grads, jax.jit(jax.grad(naive, argnums=(0, 1, 2)))(x, g, b)):
    close(a, r, 1e-12, "masked shard_map vs naive autodiff")

# jax.pmap with the same axis name: one example group per device, the same as one big batch.
xs = jax.random.normal(jax.random.key(5), (8, 4, 3), jnp.float64) * 3 + 1
g3, b3 = jnp.array([1.0, 0.5, 2.0]), jnp.array([0.1, 0.2, 0.3])
state3 = jaxbn.init_batch_norm_state(3, jnp.float64)
dys = jax.random.normal(jax.random.key(6), (8, 4, 3), jnp.float64)


def pmapped_loss(g):
    y, new = jax.pmap(lambda x, g: jaxbn.batch_norm(x, g, b3, state3, train=True,
                                                    axis_name="devices"),
                      axis_name="devices", in_axes=(0, None))(xs, g)
    return jnp.sum(y * dys), new


(_, new_p), dg_p = jax.value_and_grad(pmapped_loss, has_aux=True)(g3)
(_, new_1), dg_1 = jax.value_and_grad(
    lambda g: (lambda y, n: (jnp.sum(y * dys.reshape(32, 3)), n))(
        *jaxbn.batch_norm(xs.reshape(32, 3), g, b3, state3, train=True)), has_aux=True)(g3)
close(dg_p, dg_1, 1e-12, "pmap dgamma")
close(new_p.mean[0], new_1.mean, 1e-12, "pmap running mean")
close(new_p.var[0], new_1.var, 1e-12, "pmap running var")

# axis_index_groups: devices 0-3 and 4-7 are two batches of their own, under pmap.
groups = [[0, 1, 2, 3], [4, 5, 6, 7]]


def grouped_loss(g):
    y, new = jax.pmap(lambda x, g: jaxbn.batch_norm(x, g, b3, state3, train=True,
                                                    axis_name="devices",
                                                    axis_index_groups=groups),
                      axis_name="devices", in_axes=(0, None))(xs, g)
    return jnp.sum(y * dys), (y, new)


(_, (y_g, new_g)), dg_g = jax.value_and_grad(grouped_loss, has_aux=True)(g3)
dg_halves = 0
for half in range(2):
    part = slice(4 * half, 4 * half + 4)
    (y_h, new_h), pull = jax.vjp(lambda g: jaxbn.batch_norm(xs[part].reshape(16, 3), g, b3, state3,
                                                            train=True), g3)
    close(y_g[part].reshape(16, 3), y_h, 1e-12, f"axis_index_groups group {half} y")
    close(new_g.mean[4 * half], new_h.mean, 1e-12, f"axis_index_groups group {half} mean")
    dg_halves = dg_halves + pull((dys[part].reshape(16, 3), jax.tree.map(jnp.zeros_like,
                                                                           new_h)))[0]
close(dg_g, dg_halves, 1e-12, "axis_index_groups dgamma")

# An unknown axis name inside shard_map is a clear error.
bad = jax.shard_map(lambda x: jaxbn.batch_norm(x, g, b, state, train=True, axis_name="model")[0],
                    mesh=MESH, in_specs=P("data"), out_specs=P("data"))
try:
    jax.jit(bad)(sharded(x))
except ValueError as e:
    assert "axis_name 'model' is not bound" in str(e), e
else:
    raise AssertionError("an unbound axis_name was accepted")

print("multi-device checks passed")
