"""Data-parallel training on 4 simulated CPU devices: ``mesh=`` on fit, make_train_step,
make_epoch and the cs231n Solver, against one device. Run by tests/test_training.py as
``python tests/multidevice_training_check.py`` in a subprocess, because the device count must be
set before JAX starts; importing it runs nothing (pytest's doctest collection imports every
module). Prints the largest differences and exits non-zero (with a message) on any failure.

The compiled-program checks (no all-gather: the batch is never gathered onto one device) run on
the jnp rules (``JAXBN_NATIVE=0``, read when a function is traced): until the native kernels are
partitioned they gather a sharded batch. The checks hold for any rule that does not gather.
"""

import os
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import nets, training

rng = np.random.default_rng(0)
X = (rng.normal(size=(96, 12)) * 2 + 1).astype(np.float32)
Y = rng.integers(0, 10, 96).astype(np.int32)
VAL = X[:30], Y[:30]  # 30 examples: not a multiple of 4, so evaluation pads
OPTIMIZER = optax.sgd(0.05, momentum=0.9)  # Adam's eps=1e-8 would magnify round-off (see README)


def options(**changes):
    return {**dict(key=jax.random.key(1), epochs=3, batch_size=16, val_data=VAL, progress=False),
            **changes}


def model(seed=0):
    return nets.init_mlp(jax.random.key(seed), 12, [16], 10, normalization="batchnorm",
                         dropout_rate=0.2, weight_scale=0.1)


def largest_difference(a, b, what, tol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), what
    worst = max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
                for u, v in zip(la, lb))
    assert worst <= tol, f"{what}: largest difference {worst:.3e} > {tol:.1e}"
    return worst


def check_fit(mesh, checkpoint):
    """fit on the mesh equals fit on one device: the same batches, the same dropout masks, batch
    norm over the global batch (local statistics of 4 rows would move every number by far more)."""
    params, state = model()
    one = training.fit(nets.apply_mlp, params, state, OPTIMIZER, (X, Y), **options())
    many = training.fit(nets.apply_mlp, params, state, OPTIMIZER, (X, Y), mesh=mesh,
                        checkpoint=checkpoint, **options())
    loss_diff = largest_difference(one.history["loss"], many.history["loss"], "losses", 1e-5)
    param_diff = largest_difference(one.params, many.params, "parameters", 1e-5)
    stat_diff = largest_difference(one.net_state, many.net_state, "running statistics", 1e-5)
    np.testing.assert_array_equal(one.history["val_acc"], many.history["val_acc"])
    assert many.params["W1"].sharding.is_fully_replicated
    print(f"fit, 4 devices vs 1, 3 epochs: largest difference in the losses {loss_diff:.2e}, the "
          f"parameters {param_diff:.2e}, the running statistics {stat_diff:.2e}")
    return one, many


def check_under_the_callers_mesh(mesh, many):
    """Under the caller's own mesh context (explicit axes on current JAX), with arrays made there:
    fit and the step run on their auto-axes copy of the mesh and hand results back on the
    caller's."""
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh  # JAX 0.7: use_mesh
    with set_mesh(mesh):
        params, state = model()
        inside = training.fit(nets.apply_mlp, params, state, OPTIMIZER, (X, Y), mesh=mesh,
                              **options(epochs=1))
        assert inside.params["W1"].sharding.mesh == mesh
        step = training.make_train_step(nets.apply_mlp, OPTIMIZER, mesh=mesh)
        stepped = step(params, state, OPTIMIZER.init(params),
                       training.shard_batch((X[:16], Y[:16]), mesh), jax.random.key(0))
        float(jnp.sum(stepped[0]["W1"]))  # usable in the caller's context
    np.testing.assert_array_equal(inside.history["loss"], many.history["loss"][:6])


def check_stacked(mesh, one):
    """Stacked models on the mesh: model 0 is check_fit's single model."""
    stacked = jax.tree.map(lambda *a: jnp.stack(a), model(0), model(1))
    together = training.fit(nets.apply_mlp, *stacked, OPTIMIZER, (X, Y), mesh=mesh,
                            stacked=True, **options())
    largest_difference(one.history["loss"], together.history["loss"][:, 0], "stacked loss", 1e-5)
    largest_difference(one.params, jax.tree.map(lambda a: a[0], together.params),
                       "stacked params", 1e-5)


def check_compiled_programs(mesh):
    """The compiled step and epoch never gather the batch; the batch is split, the rest whole."""
    os.environ["JAXBN_NATIVE"] = "0"
    params, state = model()
    step = training.make_train_step(nets.apply_mlp, OPTIMIZER, mesh=mesh)
    batch = training.shard_batch((X[:16], Y[:16]), mesh)
    compiled = step.lower(params, state, OPTIMIZER.init(params), batch,
                          jax.random.key(0)).compile()
    hlo = compiled.as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo, "the train step gathers the batch"
    x_sharding = compiled.input_shardings[0][3][0]
    assert x_sharding.spec in (P(("data",)), P("data")), x_sharding
    assert all(s.is_fully_replicated for s in jax.tree.leaves(compiled.output_shardings))
    epoch = training.make_epoch(nets.apply_mlp, OPTIMIZER, num_examples=96, batch_size=16,
                                mesh=mesh)
    stack = lambda tree: jax.tree.map(lambda a: a[None], tree)
    carry = training.init_train_state(stack(params), stack(state), OPTIMIZER)[:3]
    epoch_hlo = epoch.lower(*carry, X, Y, jax.random.key(0)).compile().as_text()
    assert "all-gather" not in epoch_hlo, "the epoch gathers the batch"
    del os.environ["JAXBN_NATIVE"]


def solver(mesh, batch_size=16):
    from jaxbn.cs231n.classifiers.fc_net import FullyConnectedNet
    from jaxbn.cs231n.solver import Solver

    np.random.seed(0)
    net = FullyConnectedNet([16], input_dim=12, normalization="batchnorm", weight_scale=0.1)
    data = {"X_train": X, "y_train": Y, "X_val": VAL[0], "y_val": VAL[1]}
    return Solver(net, data, update_rule="sgd_momentum", optim_config={"learning_rate": 0.05},
                  num_epochs=1, batch_size=batch_size, verbose=False, mesh=mesh)


def check_solver(mesh):
    """The cs231n Solver with mesh=: the same minibatches, split over the devices."""
    histories = []
    for on in (None, mesh):
        run = solver(on)
        run.train()
        histories.append(np.array(run.loss_history))
    largest_difference(histories[0], histories[1], "Solver loss history", 1e-5)


def check_local_and_global(auto_mesh):
    """LOCAL on 4 devices: each device's own statistics; axis_name="data": the global batch's."""
    gamma, beta, bn_state = jnp.ones(12), jnp.zeros(12), jaxbn.init_batch_norm_state(12)
    x_sharded = training.shard_batch(X[:32], auto_mesh)

    def normalize(axis_name):
        return jax.jit(jax.shard_map(
            lambda x: jaxbn.batch_norm(x, gamma, beta, bn_state, train=True,
                                       axis_name=axis_name)[0],
            mesh=auto_mesh, in_specs=P("data"), out_specs=P("data")))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_local = np.asarray(normalize(jaxbn.LOCAL)(x_sharded))
        y_global = np.asarray(normalize("data")(x_sharded))
    whole = lambda x: np.asarray(jaxbn.batch_norm(x, gamma, beta, bn_state, train=True)[0])
    largest_difference(y_global, whole(X[:32]), "axis_name='data'", 1e-5)
    for device in range(4):
        rows = slice(8 * device, 8 * device + 8)
        largest_difference(y_local[rows], whole(X[rows]), f"LOCAL, device {device}", 1e-5)
    assert np.max(np.abs(y_local - y_global)) > 1e-2  # the two really differ


def check_resume_on_one_device(checkpoint, many):
    """The 4-device run's checkpoint resumes on one device, saying the last bits may differ."""
    params, state = model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = training.fit(nets.apply_mlp, params, state, OPTIMIZER, (X, Y),
                               resume=checkpoint, **options(epochs=4))
    messages = [str(w.message) for w in caught]
    assert any("written by a run on 4 device(s); this one has 1" in m and "last bits" in m
               for m in messages), messages
    np.testing.assert_array_equal(resumed.history["loss"][:18], many.history["loss"])
    assert resumed.history["loss"].shape == (24,) and np.all(np.isfinite(resumed.history["loss"]))


def check_bad_input(mesh):
    params, state = model()
    for call, error, match in [
        (lambda: training.fit(nets.apply_mlp, params, state, OPTIMIZER, (X, Y), mesh=mesh,
                              **options(batch_size=18)),
         ValueError, "batch_size must be a multiple of the mesh's 4 devices"),
        (lambda: training.fit(nets.apply_mlp, params, state, OPTIMIZER, (X, Y), mesh="data",
                              **options()), TypeError, "mesh must be a jax.sharding.Mesh"),
        (lambda: training.make_train_step(nets.apply_mlp, OPTIMIZER, jit=False, mesh=mesh),
         ValueError, "needs jit=True"),
        (lambda: training.shard_batch(X[:6], mesh), ValueError, "batch size must be a multiple"),
        (lambda: solver(mesh, batch_size=10), ValueError, "batch_size must be"),
    ]:
        try:
            call()
        except error as e:
            assert match in str(e), (match, str(e))
        else:
            raise AssertionError(f"no {error.__name__} for {match!r}")


def main():
    jax.config.update("jax_num_cpu_devices", 4)
    assert jax.device_count() == 4, jax.device_count()
    mesh = jax.make_mesh((4,), ("data",))  # explicit axes on current JAX: fit lays out its own
    auto_mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "run.ckpt")
        one, many = check_fit(mesh, checkpoint)
        check_under_the_callers_mesh(mesh, many)
        check_stacked(mesh, one)
        check_compiled_programs(mesh)
        check_solver(mesh)
        check_local_and_global(auto_mesh)
        check_resume_on_one_device(checkpoint, many)
        check_bad_input(mesh)
    print("multi-device training checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
