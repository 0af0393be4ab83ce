"""One process of a 2-process x 2-device run of the native kernels on a batch split across
processes; tests/test_native.py starts two of these on the loopback address. Exits non-zero
(with a message) on any failure.

``python tests/multiprocess_native_check.py PROCESS_ID PORT``: joins the run at
127.0.0.1:PORT (CPU collectives), computes batch norm's forward and jax.grad on a (16, 6) batch
split along the batch over the 4 devices, and checks its own shards of y and dx, and the
replicated gradients and running statistics, against float64 numpy on the whole batch; the
compiled step runs the kernels and has no all-gather.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.pop("JAXBN_NATIVE", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

process_id, port = int(sys.argv[1]), int(sys.argv[2])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id, initialization_timeout=60,
                           coordinator_bind_address=f"127.0.0.1:{port}")

import jaxbn  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
assert jaxbn.native_status()["enabled"], jaxbn.native_status()

rng = np.random.default_rng(0)  # the same global batch in both processes
x_np = (rng.standard_normal((16, 6)) * 2 + 3).astype(np.float32)
w_np = rng.standard_normal((16, 6)).astype(np.float32)
gamma, beta = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1.0, 1.0, 6)
state = jaxbn.init_batch_norm_state(6)

mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
sharding = NamedSharding(mesh, P("data"))
x, w = (jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
        for a in (x_np, w_np))


def loss(x, gamma, beta, w):
    y, new = jaxbn.batch_norm(x, gamma, beta, state, train=True)
    return jnp.sum(y * w), (y, new)


step = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
compiled = step.lower(x, gamma, beta, w).compile()
hlo = compiled.as_text()
assert "jaxbn_batch_norm" in hlo, "the native kernels did not run"
assert "all-gather" not in hlo, "x was gathered"
(dx, dgamma, dbeta), (y, new) = compiled(x, gamma, beta, w)

# float64 on the whole batch
x64, w64, g64, b64 = (np.asarray(a, np.float64) for a in (x_np, w_np, gamma, beta))
mean, var = x64.mean(0), x64.var(0)
inv_std = 1.0 / np.sqrt(var + 1e-5)
x_hat = (x64 - mean) * inv_std
g = w64 * g64
expected = {"y": g64 * x_hat + b64,
            "dx": inv_std * (g - g.mean(0) - x_hat * (g * x_hat).mean(0)),
            "dgamma": (w64 * x_hat).sum(0), "dbeta": w64.sum(0),
            "running mean": 0.1 * mean, "running var": 0.9 + 0.1 * var}


def check(name, got, want):
    err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
    assert err <= 2e-6, f"process {process_id}: {name} relative error {err:.2e}"


for name, a in (("y", y), ("dx", dx)):
    assert a.sharding.spec[0] == "data", f"{name} sharded {a.sharding}"
    for shard in a.addressable_shards:
        check(name, shard.data, expected[name][shard.index])
for name, a in (("dgamma", dgamma), ("dbeta", dbeta), ("running mean", new.mean),
                ("running var", new.var)):
    check(name, a.addressable_shards[0].data, expected[name])

print(f"process {process_id}: multi-process native checks passed", flush=True)
jax.distributed.shutdown()
