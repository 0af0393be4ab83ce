"""jaxbn.training: overfitting, resumption, atomic checkpoints, stacked models, bad input, and
data parallelism (mesh=; the multi-process runs are in tests/test_multiprocess.py)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbn import nets, training


def _data(n=50, d=20, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, classes, n).astype(np.int32)


def _model(normalization=None, dropout_rate=0.0, seed=0, weight_scale=5e-2, d=20):
    return nets.init_mlp(jax.random.key(seed), d, [64, 64], 10, normalization=normalization,
                         dropout_rate=dropout_rate, weight_scale=weight_scale)


def _equal_trees(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(la, lb))


@pytest.mark.slow
@pytest.mark.parametrize("normalization", [None, "batchnorm"])
def test_overfits_50_examples_within_20_epochs(normalization):
    """cs231n's sanity check: a 3-layer net memorizes 50 examples."""
    x, y = _data()
    params, state = _model(normalization)
    result = training.fit(nets.apply_mlp, params, state, optax.adam(1e-2), (x, y),
                          key=jax.random.key(1), epochs=20, batch_size=25, progress=False)
    assert result.history["train_acc"][-1] == 1.0
    assert result.history["loss"].shape == (40,)
    assert result.history["loss"][-1] < result.history["loss"][0]


def test_train_step_works_with_an_optax_schedule_and_reduces_loss():
    x, y = _data()
    params, state = _model("batchnorm", dropout_rate=0.2)
    schedule = optax.exponential_decay(1e-2, transition_steps=2, decay_rate=0.95, staircase=True)
    optimizer = optax.sgd(schedule, momentum=0.9)
    step = training.make_train_step(nets.apply_mlp, optimizer, reg=1e-3)
    opt_state = optimizer.init(params)
    losses = []
    for i in range(60):
        params, state, opt_state, metrics = step(params, state, opt_state, (x, y),
                                                 jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert not np.allclose(state.batch_norm[0].mean, 0.0)


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path, interrupt_after=2):
    x, y = _data(80)
    xv, yv = _data(30, seed=1)
    params, state = _model("batchnorm", dropout_rate=0.3)
    kwargs = dict(key=jax.random.key(7), batch_size=16, reg=1e-3, val_data=(xv, yv),
                  progress=False)
    full = training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), (x, y), epochs=4,
                        **kwargs)
    path = tmp_path / "run.ckpt"
    training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), (x, y), epochs=interrupt_after,
                 checkpoint=path, **kwargs)
    resumed = training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), (x, y), epochs=4,
                           resume=path, **kwargs)
    assert _equal_trees(full.params, resumed.params)
    assert _equal_trees(full.net_state, resumed.net_state)
    assert _equal_trees(full.opt_state, resumed.opt_state)
    assert _equal_trees(full.best_params, resumed.best_params)
    for k in full.history:
        np.testing.assert_array_equal(full.history[k], resumed.history[k])


def _checkpointed_run(tmp_path, epochs=1, name="run.ckpt", **kw):
    x, y = _data(40)
    params, state = _model("batchnorm")
    path = tmp_path / name
    kwargs = dict(key=jax.random.key(0), epochs=epochs, batch_size=10, checkpoint=path,
                  progress=False)
    training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), (x, y), **{**kwargs, **kw})
    return path, (x, y), kwargs


def _resume(path, data, kwargs, model=None, optimizer=None):
    params, state = model or _model("batchnorm")
    return training.fit(nets.apply_mlp, params, state, optimizer or optax.adam(1e-3), data,
                        **{**kwargs, "epochs": 2, "checkpoint": None, "resume": path})


def test_checkpoint_holds_everything_and_interrupted_write_keeps_the_previous(tmp_path,
                                                                              monkeypatch):
    path, data, kwargs = _checkpointed_run(tmp_path)
    params, state = _model("batchnorm")
    like = training.init_train_state(training._stack(params), training._stack(state),
                                     optax.adam(1e-3))
    saved = training.restore_train_state(path, like, training._fingerprint(
        jax.random.key(0), 40, 10, 1, 0.0))
    assert saved.epoch == 1 and saved.history["loss"].shape == (4, 1)
    assert int(saved.opt_state[0].count[0]) == 4  # adam took 4 steps
    before = path.read_bytes()

    def crash_midway(fd):
        raise KeyboardInterrupt  # the bytes reached the temporary file, then the process died

    monkeypatch.setattr(os, "fsync", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), data,
                     **{**kwargs, "epochs": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary left behind


def test_checkpoint_arrays_come_back_into_the_callers_tree(tmp_path):
    tree = {"w": {"a": np.arange(6.0).reshape(2, 3), "b": np.int32(7)}, "s": (np.ones(2),)}
    training.save_checkpoint(tmp_path / "c", tree, {"note": "hi"})
    back, meta = training.load_checkpoint(tmp_path / "c", tree)
    assert meta == {"note": "hi"} and jax.tree.structure(back) == jax.tree.structure(tree)
    assert _equal_trees(back, tree)
    with pytest.raises(ValueError, match=r"w leaf 0 is float64\(2, 3\) in the file but "
                                         r"float64\(3, 2\) in this run"):
        training.load_checkpoint(tmp_path / "c", {**tree, "w": {"a": np.ones((3, 2)),
                                                                "b": np.int32(0)}})


def _damage(kind, path):
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "corrupted":  # bytes flipped inside a stored array: the zip CRC catches it
        middle = len(data) // 3
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64])
                         + data[middle + 64:])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "other-version":
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(arrays["__meta__.json"].tobytes())
        meta["version"] = 1
        arrays["__meta__.json"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        with open(path, "wb") as f:
            np.savez(f, **arrays)


@pytest.mark.parametrize("kind,match", [
    ("truncated", "cannot be read: it is truncated, damaged"),
    ("corrupted", "cannot be read|damaged"),
    ("empty", "cannot be read"),
    ("other-version", "format version 1; this jaxbn reads version 2"),
])
def test_damaged_checkpoint_gives_a_clear_error_naming_the_file(tmp_path, kind, match):
    path, data, kwargs = _checkpointed_run(tmp_path)
    _damage(kind, path)
    with pytest.raises(ValueError, match=match) as info:
        _resume(path, data, kwargs)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("change", ["architecture", "optimizer", "settings"])
def test_resume_with_another_model_optimizer_or_settings_is_refused(tmp_path, change):
    path, data, kwargs = _checkpointed_run(tmp_path)
    if change == "architecture":  # [50] hidden units, no normalization
        model = nets.init_mlp(jax.random.key(0), 20, [50], 10)
        with pytest.raises(ValueError, match="its params differ in structure"):
            _resume(path, data, kwargs, model=model)
    elif change == "optimizer":
        with pytest.raises(ValueError, match="its opt_state differ in structure"):
            _resume(path, data, kwargs, optimizer=optax.sgd(1e-3))
    else:
        with pytest.raises(ValueError, match="other data, batch size"):
            _resume(path, data, {**kwargs, "batch_size": 20})


class _RunsCode:
    """Unpickling this object calls ``open(sentinel, "w")``: proof that code would run."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


@pytest.mark.parametrize("container", ["pickle", "npz-object-array"])
def test_loading_a_file_crafted_to_run_code_does_not_run_it(tmp_path, container):
    path, data, kwargs = _checkpointed_run(tmp_path)
    sentinel = tmp_path / "code-ran"
    if container == "pickle":
        path.write_bytes(pickle.dumps({"version": 2, "params": _RunsCode(sentinel)}))
    else:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        arrays["params/0"] = np.array([_RunsCode(sentinel)], dtype=object)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    with pytest.raises(ValueError, match="cannot be read"):
        _resume(path, data, kwargs)
    assert not sentinel.exists()
    if container == "pickle":  # the crafted file does run code when unpickled: the test is real
        pickle.loads(path.read_bytes())
        assert sentinel.exists()


def test_pieces_of_fit_work_alone():
    x, y = _data(30)
    params, state = _model("batchnorm")
    stacked = training.init_train_state(training._stack(params), training._stack(state),
                                        optax.sgd(0.1))
    epoch = training.make_epoch(nets.apply_mlp, optax.sgd(0.1), num_examples=30, batch_size=10)
    *trained, losses = epoch(*stacked[:3], x, y, jax.random.key(0))
    assert losses.shape == (3, 1) and np.all(np.isfinite(losses))
    predict = training.make_predict(nets.apply_mlp)
    acc = training.evaluate(predict, *trained[:2], x, y, batch_size=7)
    pred = jnp.argmax(nets.apply_mlp(training._unstack(trained[0]),
                                     training._unstack(trained[1]), x, train=False)[0], -1)
    assert acc.shape == (1,) and acc[0] == pytest.approx(float(jnp.mean(pred == y)))
    better = training.record_epoch(stacked, *trained, losses, acc, np.array([0.5]))
    worse = training.record_epoch(better, *stacked[:3], losses, acc, np.array([0.25]))
    assert worse.epoch == 2 and worse.history["val_acc"].tolist() == [[0.5], [0.25]]
    assert float(worse.best_val_acc[0]) == 0.5
    assert _equal_trees(worse.best_params, trained[0])  # the worse epoch did not replace it
    assert _equal_trees(worse.params, stacked.params)


def test_make_train_step_takes_a_loss_function():
    x, y = _data(20)
    params, state = _model()
    calls = []

    def squared_hinge(scores, labels):
        calls.append(scores.shape)
        margins = scores - jnp.take_along_axis(scores, labels[:, None], -1) + 1.0
        return jnp.mean(jnp.sum(jnp.maximum(margins, 0.0) ** 2, -1))

    step = training.make_train_step(nets.apply_mlp, optax.sgd(1e-2), loss_fn=squared_hinge)
    _, _, _, metrics = step(params, state, optax.sgd(1e-2).init(params), (x, y), None)
    scores = nets.apply_mlp(params, state, x, train=True)[0]
    assert calls == [(20, 10)]
    assert float(metrics["loss"]) == pytest.approx(float(squared_hinge(scores, y)), rel=1e-6)


@pytest.mark.slow
def test_vmap_over_three_stacked_models_equals_three_runs():
    x, y = _data(60)
    scales = [1e-2, 5e-2, 1e-1]
    models = [_model("batchnorm", weight_scale=s, seed=i) for i, s in enumerate(scales)]
    stacked_params = jax.tree.map(lambda *a: jnp.stack(a), *[m[0] for m in models])
    stacked_state = jax.tree.map(lambda *a: jnp.stack(a), *[m[1] for m in models])
    kwargs = dict(key=jax.random.key(3), epochs=3, batch_size=20, progress=False)
    together = training.fit(nets.apply_mlp, stacked_params, stacked_state, optax.adam(1e-3),
                            (x, y), stacked=True, **kwargs)
    assert together.history["loss"].shape == (9, 3)
    for i, (p, s) in enumerate(models):
        alone = training.fit(nets.apply_mlp, p, s, optax.adam(1e-3), (x, y), **kwargs)
        for name in alone.params:
            if name in ("b1", "b2"):
                # Biases that feed batch norm have an exactly zero gradient; adam scales the
                # round-off left in it up to full steps, so these two leaves are noise.
                continue
            np.testing.assert_allclose(alone.params[name], together.params[name][i], rtol=1e-5,
                                       atol=1e-6, err_msg=name)
        np.testing.assert_allclose(alone.history["loss"], together.history["loss"][:, i],
                                   rtol=1e-5)


def test_best_validation_parameters_are_kept():
    x, y = _data(60)
    xv, yv = _data(40, seed=5)
    params, state = _model()
    result = training.fit(nets.apply_mlp, params, state, optax.adam(3e-2), (x, y),
                          key=jax.random.key(0), epochs=8, batch_size=20, val_data=(xv, yv),
                          progress=False)
    best_epoch = int(np.argmax(result.history["val_acc"]))
    assert float(result.best_val_acc) == result.history["val_acc"][best_epoch]
    pred = jnp.argmax(nets.apply_mlp(result.best_params, result.best_net_state, xv,
                                     train=False)[0], -1)
    assert float(jnp.mean(pred == yv)) == pytest.approx(result.history["val_acc"][best_epoch])


def test_bad_input():
    x, y = _data(20)
    params, state = _model()
    fit = lambda data, **kw: training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), data,
                                          key=jax.random.key(0), progress=False,
                                          **{"epochs": 1, "batch_size": 10, **kw})
    with pytest.raises(ValueError, match="same number of examples"):
        fit((x, y[:-1]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        fit((x, y + 5))
    with pytest.raises(ValueError, match="batch_size must be at most"):
        fit((x, y), batch_size=21)
    with pytest.raises(TypeError, match="labels must be a 1-D integer"):
        fit((x, y.astype(np.float32)))
    with pytest.raises(ValueError, match="W1's input dimension|features"):
        fit((x[:, :5], y))
    with pytest.raises(ValueError, match="val_data x must have examples"):
        fit((x, y), val_data=(x[:, :5], y))
    with pytest.raises(TypeError, match="optimizer"):
        training.make_train_step(nets.apply_mlp, "adam")
    with pytest.raises(TypeError, match="loss_fn"):
        training.make_train_step(nets.apply_mlp, optax.sgd(1.0), loss_fn="hinge")


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    x, y = _data(20)
    params, state = _model()
    path = tmp_path / "bogus.npz"
    np.savez(path, x=np.ones(3))
    with pytest.raises(ValueError, match="is not a jaxbn checkpoint: it has no metadata"):
        training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), (x, y),
                     key=jax.random.key(0), epochs=1, batch_size=10, progress=False, resume=path)


def test_progress_bar_on_request_and_off_by_flag(capsys):
    x, y = _data(20)
    params, state = _model()
    run = lambda progress: training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), (x, y),
                                        key=jax.random.key(0), epochs=2, batch_size=10,
                                        progress=progress, desc="demo")
    run(True)
    err = capsys.readouterr().err
    assert "demo" in err and "/2 [" in err and "loss=" in err
    run(False)
    assert capsys.readouterr().err == ""
    run(None)  # pytest's captured stderr is not a terminal: off
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_data_parallel_training_on_four_devices():
    """fit/make_train_step/make_epoch/Solver with mesh= against one device, no all-gather in the
    compiled step, LOCAL vs global statistics, resuming on another device count (a subprocess:
    the device count is set before JAX starts)."""
    script = os.path.join(os.path.dirname(__file__), "multidevice_training_check.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "multi-device training checks passed" in proc.stdout


@pytest.mark.slow
def test_a_one_device_mesh_gives_the_same_bits_as_no_mesh(tmp_path):
    """The mesh path draws the permutation and gathers the batches on the host: the same batches
    as the jitted gather, so on one device the same bits; its checkpoint resumes without mesh."""
    x, y = _data(40)
    params, state = _model("batchnorm", dropout_rate=0.2)
    kwargs = dict(key=jax.random.key(3), epochs=2, batch_size=10, val_data=_data(13, seed=2),
                  progress=False)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    plain = training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), (x, y), **kwargs)
    meshed = training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), (x, y), mesh=mesh,
                          checkpoint=tmp_path / "run.ckpt", **kwargs)
    assert _equal_trees(plain.params, meshed.params)
    assert _equal_trees(plain.net_state, meshed.net_state)
    for k in plain.history:
        np.testing.assert_array_equal(plain.history[k], meshed.history[k])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same device count: no warning
        training.restore_train_state(
            tmp_path / "run.ckpt", training.init_train_state(
                training._stack(params), training._stack(state), optax.adam(1e-3)),
            training._fingerprint(jax.random.key(3), 40, 10, 1, 0.0))


def test_progress_bar_comes_from_process_zero_only(monkeypatch):
    assert training._progress(True, 2, "demo") is not None
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert training._progress(True, 2, "demo") is None


def test_processes_that_disagree_on_data_or_checkpoint_are_refused(tmp_path, monkeypatch):
    """On several processes every one must pass the same data and read the same checkpoint; a
    second process is simulated here (the digests it would report), the real two-process runs
    are in tests/test_multiprocess.py."""
    path, data, kwargs = _checkpointed_run(tmp_path)
    params, state = _model("batchnorm")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(training.multihost_utils, "process_allgather",
                        lambda mine: np.stack([mine, mine ^ 1]))  # process 1: another digest
    with pytest.raises(ValueError, match=r"given different train_data \(process 0: crc "
                                         r"[0-9a-f]{8}, process 1: crc [0-9a-f]{8}\)\. Every "
                                         r"process passes the same global data"):
        mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
        training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), data,
                     **{**kwargs, "mesh": mesh})
    monkeypatch.setattr(training.multihost_utils, "process_allgather",
                        lambda mine: np.stack([mine, np.full_like(mine, -1)]))  # no file there
    with pytest.raises(ValueError, match=r"read different files \(process 0: crc [0-9a-f]{8}, "
                                         r"process 1: no file\)\. .*a file system they share"):
        _resume(path, data, kwargs)
