"""jaxbn.training: overfitting, resumption, atomic checkpoints, stacked models, bad input."""

from __future__ import annotations

import os
import pickle

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


def test_checkpoint_holds_everything_and_interrupted_write_keeps_the_previous(tmp_path,
                                                                              monkeypatch):
    x, y = _data(40)
    params, state = _model("batchnorm")
    path = tmp_path / "ckpt.pkl"
    training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), (x, y), key=jax.random.key(0),
                 epochs=1, batch_size=10, checkpoint=path, progress=False)
    saved = training.load_checkpoint(path)
    assert {"params", "net_state", "opt_state", "step", "key", "history", "epoch"} <= set(saved)
    assert saved["epoch"] == 1 and saved["step"] == 4
    before = path.read_bytes()

    real_dump = pickle.dump

    def crash_midway(obj, f, protocol=None):
        f.write(b"partial bytes of a checkpoint")  # some bytes reach the temporary file...
        raise KeyboardInterrupt  # ...then the process is interrupted

    monkeypatch.setattr(pickle, "dump", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        training.fit(nets.apply_mlp, params, state, optax.adam(1e-3), (x, y),
                     key=jax.random.key(0), epochs=2, batch_size=10, checkpoint=path,
                     progress=False)
    monkeypatch.setattr(pickle, "dump", real_dump)
    assert path.read_bytes() == before
    assert training.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pkl"]  # no temporary left behind


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
    with pytest.raises(ValueError, match="not a jaxbn checkpoint"):
        path = os.path.join(os.path.dirname(__file__), "__bogus.pkl")
        try:
            with open(path, "wb") as f:
                pickle.dump({"x": 1}, f)
            fit((x, y), resume=path)
        finally:
            os.remove(path)


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
