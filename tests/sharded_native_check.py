"""The native kernels under jax.jit with sharded inputs, on 8 simulated devices; run by
tests/test_native.py in a subprocess (the device count must be set before JAX starts). Exits
non-zero (with a message) on any failure.

For batch_norm and spatial_batch_norm (NCHW, NHWC), forward + jax.grad with a random cotangent,
under auto mesh axes and explicit ones (``jax.set_mesh``): the compiled program runs the kernels
and has no all-gather, y and dx keep x's sharding, and the values (y, dx, dgamma, dbeta, the new
running statistics) equal the one-device call.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.pop("JAXBN_NATIVE", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

import jaxbn  # noqa: E402

assert jax.device_count() == 8, jax.device_count()
assert jaxbn.native_status()["enabled"], jaxbn.native_status()
set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh  # JAX < 0.8: use_mesh

# (name, x shape, layout (None: batch_norm over the last axis), mesh shape, x's spec)
CASES = [
    ("batch_norm, batch split", (64, 8), None, (8,), P("data")),
    ("NCHW, batch split", (16, 3, 4, 4), "NCHW", (8,), P("data")),
    ("NCHW, height split", (2, 3, 8, 4), "NCHW", (8,), P(None, None, "data")),
    ("NHWC, batch x width split", (4, 4, 4, 3), "NHWC", (2, 4), P("a", None, "b")),
    ("NHWC, channels split", (4, 2, 2, 16), "NHWC", (8,), P(None, None, None, "data")),
]


def batch_norm(layout, x, gamma, beta, state):
    if layout is None:
        return jaxbn.batch_norm(x, gamma, beta, state, train=True)
    return jaxbn.spatial_batch_norm(x, gamma, beta, state, train=True, layout=layout)


STEPS = {}


def train_step(layout):
    """jax.grad of sum(y * w) for x, gamma and beta, with y and the new running statistics."""
    if layout not in STEPS:
        def loss(x, gamma, beta, w, state):
            y, new = batch_norm(layout, x, gamma, beta, state)
            return jnp.sum(y * w), (y, new)
        STEPS[layout] = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    return STEPS[layout]


def layer_only(layout):
    """The batch norm alone (forward and VJP, no loss): what a channel split runs per device."""
    def run(x, gamma, beta, w, state):
        (y, new), pullback = jax.vjp(lambda *a: batch_norm(layout, *a, state), x, gamma, beta)
        return y, new, pullback((w, jax.tree.map(jnp.zeros_like, new)))
    return jax.jit(run)


def close(a, b, what, tol=2e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def spec_of(a, ndim):
    spec = tuple(a.sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def check(name, shape, layout, mesh_shape, spec):
    names = ("data",) if len(mesh_shape) == 1 else ("a", "b")
    c = shape[-1] if layout in (None, "NHWC") else shape[1]
    k = jax.random.split(jax.random.key(len(name)), 4)
    x = jax.random.normal(k[0], shape) * 2.0 + 3.0
    w = jax.random.normal(k[1], shape)  # the cotangent of y
    gamma, beta = jax.random.normal(k[2], (c,)) * 0.5 + 1.0, jax.random.normal(k[3], (c,))
    state = jaxbn.init_batch_norm_state(c)
    step = train_step(layout)
    grads1, (y1, new1) = step(x, gamma, beta, w, state)  # one device
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh(mesh_shape, names, axis_types=(axis_type,) * len(names))
        sharding = NamedSharding(mesh, spec)
        xs, ws = jax.device_put(x, sharding), jax.device_put(w, sharding)
        what = f"{name} ({axis_type})"
        with set_mesh(mesh):
            compiled = step.lower(xs, gamma, beta, ws, state).compile()
            grads8, (y8, new8) = compiled(xs, gamma, beta, ws, state)
            if name.endswith("channels split"):
                alone = layer_only(layout).lower(xs, gamma, beta, ws, state).compile().as_text()
                assert "all-reduce" not in alone and "all-gather" not in alone, \
                    f"{what}: a channel split needs no collective"
        hlo = compiled.as_text()
        assert "jaxbn_batch_norm" in hlo, f"{what}: the native kernels did not run"
        assert "all-gather" not in hlo, f"{what}: x was gathered"
        want = spec_of(xs, len(shape))
        for label, a in (("y", y8), ("dx", grads8[0])):
            assert spec_of(a, len(shape)) == want, \
                f"{what}: {label} sharded {a.sharding.spec}, x {spec}"
        close(y8, y1, what + " y")
        for label, a, b in zip(("dx", "dgamma", "dbeta"), grads8, grads1):
            close(a, b, f"{what} {label}")
        close(new8.mean, new1.mean, what + " running mean")
        close(new8.var, new1.var, what + " running var")


for case in CASES:
    check(*case)

# lax.scan over steps with jax.checkpoint, x split along the batch (auto axes): no gather.
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
gamma, beta = jnp.linspace(0.5, 1.5, 4), jnp.zeros(4)


def scanned(x):
    def body(state, _):
        y, state = jax.checkpoint(lambda x, s: jaxbn.batch_norm(x, gamma, beta, s,
                                                                train=True))(x, state)
        return state, jnp.sum(y * y * x)
    return jax.lax.scan(body, jaxbn.init_batch_norm_state(4), None, length=3)


x = jax.random.normal(jax.random.key(7), (32, 4)) + 5.0
run = jax.jit(jax.value_and_grad(lambda x: jnp.sum(scanned(x)[1])))
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
(loss8, dx8), (loss1, dx1) = run(xs), run(x)
assert "all-gather" not in run.lower(xs).compile().as_text(), "scan + checkpoint gathered x"
close(dx8, dx1, "scan + checkpoint dx")
assert spec_of(dx8, 2) == ("data", None), dx8.sharding

# jax.vmap over models (the kernels take the mapped axis as one more batch axis), each model's
# batch split: per-model statistics, no gather.
xv = jax.random.normal(jax.random.key(8), (3, 16, 4)) * 2 + 1
vstep = jax.jit(jax.vmap(lambda x: jaxbn.batch_norm(x, gamma, beta, jaxbn.init_batch_norm_state(4),
                                                    train=True)[0]))
xvs = jax.device_put(xv, NamedSharding(mesh, P(None, "data")))
compiled = vstep.lower(xvs).compile()
assert "all-gather" not in compiled.as_text() and "jaxbn_batch_norm" in compiled.as_text()
close(compiled(xvs), jnp.stack([vstep(xv[i:i + 1])[0] for i in range(3)]), "vmap y")

# shard_map without axis_name: each device normalizes its own slice (the kernels, locally).
local = jax.jit(jax.shard_map(
    lambda x: jaxbn.batch_norm(x, gamma, beta, jaxbn.init_batch_norm_state(4), train=True)[0],
    mesh=mesh, in_specs=P("data"), out_specs=P("data")))
assert "jaxbn_batch_norm" in local.lower(xs).compile().as_text()
close(local(xs), jnp.concatenate([train_step(None)(x[i:i + 4], gamma, beta, x[i:i + 4],
                                                   jaxbn.init_batch_norm_state(4))[1][0]
                                  for i in range(0, 32, 4)]), "shard_map per-device y")

# A mesh mixing explicit and auto axes: the type shows only part of the split, so the jnp rules
# run (never a gather).
mixed = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Explicit, AxisType.Auto))
xm = jax.device_put(x, NamedSharding(mixed, P("a")))
with set_mesh(mixed):
    hlo = train_step(None).lower(xm, gamma, beta, xm, jaxbn.init_batch_norm_state(4))
    hlo = hlo.compile().as_text()
assert "jaxbn_batch_norm" not in hlo and "all-gather" not in hlo, "mixed mesh"

# The fused epilogue (residual + ReLU), batch split (the kernels' split programs) and channels
# split (the fused kernels per device): the values of one device, no gather.
def fused_loss(x, gamma, beta, r, w):
    state = jaxbn.init_batch_norm_state(x.shape[-1])
    y, _ = jaxbn.batch_norm(x, gamma, beta, state, train=True, residual=r, activation="relu")
    return jnp.sum(y * w), y


fused = jax.jit(jax.grad(fused_loss, argnums=(0, 1, 2, 3), has_aux=True))
for spec, c in ((P("data"), 4), (P(None, "data"), 16)):
    k = jax.random.split(jax.random.key(c), 3)
    x, r, w = (jax.random.normal(ki, (32, c)) for ki in k)
    params = (jnp.linspace(0.5, 1.5, c), jnp.linspace(-0.5, 0.5, c))
    grads1, y1 = fused(x, *params, r, w)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
        xs, rs, ws = (jax.device_put(a, NamedSharding(mesh, spec)) for a in (x, r, w))
        with set_mesh(mesh):
            compiled = fused.lower(xs, *params, rs, ws).compile()
            grads8, y8 = compiled(xs, *params, rs, ws)
        what = f"fused, {spec} ({axis_type})"
        hlo = compiled.as_text()
        assert "jaxbn_batch_norm" in hlo and "all-gather" not in hlo, what
        close(y8, y1, what + " y")
        for label, a, b in zip(("dx", "dgamma", "dbeta", "dresidual"), grads8, grads1):
            close(a, b, f"{what} {label}")

print("sharded native checks passed")
