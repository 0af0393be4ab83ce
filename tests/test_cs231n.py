"""jaxbn.cs231n against an independent numpy implementation, finite differences and the core."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn.cs231n import (
    FullyConnectedNet,
    affine_backward,
    affine_forward,
    batchnorm_backward,
    batchnorm_backward_alt,
    batchnorm_forward,
    dropout_backward,
    dropout_forward,
    eval_numerical_gradient,
    eval_numerical_gradient_array,
    layernorm_backward,
    layernorm_forward,
    rel_error,
    relu_backward,
    relu_forward,
    softmax_loss,
    spatial_batchnorm_backward,
    spatial_batchnorm_forward,
    spatial_groupnorm_backward,
    spatial_groupnorm_forward,
)

import numpy_cs231n as ref


def _close(a, b, tol=1e-12):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


def _fd_errors(forward, backward, args, dout, h=1e-5):
    """Finite differences of every input of ``forward`` against ``backward``'s gradients."""
    _, cache = forward(*args)
    grads = backward(dout, cache)
    errors = []
    for i, g in enumerate(grads):
        def f(a, i=i):
            call = list(args)
            call[i] = a
            return forward(*call)[0]
        numeric = eval_numerical_gradient_array(f, np.array(args[i], copy=True), dout, h=h)
        errors.append(rel_error(numeric, g))
    return errors


@pytest.fixture
def rng():
    return np.random.default_rng(231)


def test_outputs_are_numpy_arrays(rng):
    x = rng.normal(size=(4, 3))
    out, cache = batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "train"})
    dx, dgamma, dbeta = batchnorm_backward(np.ones_like(out), cache)
    assert all(isinstance(a, np.ndarray) for a in (out, dx, dgamma, dbeta))
    assert out.dtype == np.float64 and dgamma.shape == (3,) and dbeta.shape == (3,)


def test_batchnorm_matches_numpy_train_then_test(rng):
    """Running statistics after many train calls, then a test call, as the notebook checks."""
    n, d = 8, 5
    gamma, beta = rng.normal(size=d), rng.normal(size=d)
    ours, theirs = {"mode": "train", "momentum": 0.8}, {"mode": "train", "momentum": 0.8}
    for _ in range(50):
        x = rng.normal(size=(n, d)) * 3 + 2
        out, cache = batchnorm_forward(x, gamma, beta, ours)
        out_ref, cache_ref = ref.batchnorm_forward(x, gamma, beta, theirs)
        _close(out, out_ref)
    _close(ours["running_mean"], theirs["running_mean"])
    _close(ours["running_var"], theirs["running_var"])
    dout = rng.normal(size=(n, d))
    expected_grads = ref.batchnorm_backward(dout, cache_ref)
    for mine, expected in zip(batchnorm_backward(dout, cache), expected_grads):
        _close(mine, expected, 1e-11)
    ours["mode"] = theirs["mode"] = "test"
    x = rng.normal(size=(n, d))
    _close(batchnorm_forward(x, gamma, beta, ours)[0],
           ref.batchnorm_forward(x, gamma, beta, theirs)[0])


def test_batchnorm_default_running_statistics_are_zeros(rng):
    x = rng.normal(size=(6, 3))
    bn_param = {"mode": "train"}
    batchnorm_forward(x, np.ones(3), np.zeros(3), bn_param)
    _close(bn_param["running_mean"], 0.1 * x.mean(0))
    _close(bn_param["running_var"], 0.1 * x.var(0))


def test_two_backwards_agree_and_equal_the_core_vjp(rng):
    x = rng.normal(size=(10, 6)) * 5 + 12
    gamma, beta = rng.normal(size=6), rng.normal(size=6)
    dout = rng.normal(size=(10, 6))
    _, cache = batchnorm_forward(x, gamma, beta, {"mode": "train"})
    graph = batchnorm_backward(dout, cache)
    alt = batchnorm_backward_alt(dout, cache)
    state = jaxbn.init_batch_norm_state(6, jnp.float64)
    _, pullback = jax.vjp(lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True)[0],
                          x, gamma, beta)
    core = pullback(dout)
    for a, b, c in zip(graph, alt, core):
        _close(a, b, 1e-12)
        _close(a, c, 1e-12)


def test_backwards_are_the_core_rules_not_copies():
    """The cs231n backwards call the functions the custom_vjp registers."""
    import inspect
    import pathlib

    from jaxbn import _normalize
    from jaxbn.cs231n import layers
    assert '"graph"' in inspect.getsource(layers.batchnorm_backward)
    assert '"alt"' in inspect.getsource(layers.batchnorm_backward_alt)
    assert layers._RULES["graph"].__wrapped__ is _normalize.graph_rule
    assert layers._RULES["alt"].__wrapped__ is _normalize.alt_rule
    package = pathlib.Path(layers.__file__).parent
    for path in package.rglob("*.py"):  # no second copy of the normalization math
        src = path.read_text()
        assert "sqrt(" not in src or path.name == "optim.py", path.name


@pytest.mark.parametrize("backward", [batchnorm_backward, batchnorm_backward_alt],
                         ids=["graph", "alt"])
def test_batchnorm_finite_differences(backward, rng):
    x = 5 * rng.normal(size=(4, 5)) + 12
    args = (x, rng.normal(size=5), rng.normal(size=5))
    dout = rng.normal(size=(4, 5))
    fwd = lambda x, g, b: batchnorm_forward(x, g, b, {"mode": "train"})
    assert max(_fd_errors(fwd, backward, args, dout)) <= 1e-8


def test_layernorm_matches_numpy_and_finite_differences(rng):
    x = 5 * rng.normal(size=(4, 6)) + 12
    gamma, beta = rng.normal(size=6), rng.normal(size=6)
    dout = rng.normal(size=(4, 6))
    out, cache = layernorm_forward(x, gamma, beta, {})
    out_ref, cache_ref = ref.layernorm_forward(x, gamma, beta)
    _close(out, out_ref)
    for a, b in zip(layernorm_backward(dout, cache), ref.layernorm_backward(dout, cache_ref)):
        _close(a, b, 1e-11)
    fwd = lambda x, g, b: layernorm_forward(x, g, b, {"eps": 1e-5})
    assert max(_fd_errors(fwd, layernorm_backward, (x, gamma, beta), dout)) <= 1e-8


def test_spatial_batchnorm_matches_numpy_and_finite_differences(rng):
    x = 4 * rng.normal(size=(2, 3, 4, 5)) + 10
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    dout = rng.normal(size=x.shape)
    ours, theirs = {"mode": "train"}, {"mode": "train"}
    out, cache = spatial_batchnorm_forward(x, gamma, beta, ours)
    out_ref, cache_ref = ref.spatial_batchnorm_forward(x, gamma, beta, theirs)
    _close(out, out_ref)
    _close(ours["running_var"], theirs["running_var"])
    for a, b in zip(spatial_batchnorm_backward(dout, cache),
                    ref.spatial_batchnorm_backward(dout, cache_ref)):
        _close(a, b, 1e-11)
    fwd = lambda x, g, b: spatial_batchnorm_forward(x, g, b, {"mode": "train"})
    assert max(_fd_errors(fwd, spatial_batchnorm_backward, (x, gamma, beta), dout)) <= 1e-6
    ours["mode"] = theirs["mode"] = "test"
    _close(spatial_batchnorm_forward(x, gamma, beta, ours)[0],
           ref.spatial_batchnorm_forward(x, gamma, beta, theirs)[0])


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_groupnorm_matches_numpy_and_finite_differences(groups, rng):
    x = 4 * rng.normal(size=(2, 6, 3, 2)) + 10
    gamma = rng.normal(size=(1, 6, 1, 1))
    beta = rng.normal(size=(1, 6, 1, 1))
    dout = rng.normal(size=x.shape)
    out, cache = spatial_groupnorm_forward(x, gamma, beta, groups, {})
    out_ref, cache_ref = ref.groupnorm_forward(x, gamma, beta, groups)
    _close(out, out_ref)
    grads = spatial_groupnorm_backward(dout, cache)
    assert grads[1].shape == (1, 6, 1, 1) and grads[2].shape == (1, 6, 1, 1)
    for a, b in zip(grads, ref.groupnorm_backward(dout, cache_ref)):
        _close(a, b, 1e-11)
    fwd = lambda x, g, b: spatial_groupnorm_forward(x, g, b, groups, {"eps": 1e-5})
    # rel_error is elementwise: on dx's smallest entries (x at offset 10) the central differences'
    # rounding alone is about 1e-7 and moves with the compiled code; the backward itself is held
    # to the reference at 1e-11 above.
    assert max(_fd_errors(fwd, spatial_groupnorm_backward, (x, gamma, beta), dout)) <= 1e-6


def test_affine_relu_softmax_match_numpy(rng):
    x = rng.normal(size=(3, 2, 4))
    w, b = rng.normal(size=(8, 5)), rng.normal(size=5)
    out, cache = affine_forward(x, w, b)
    _close(out, x.reshape(3, 8) @ w + b)
    dout = rng.normal(size=(3, 5))
    dx, dw, db = affine_backward(dout, cache)
    _close(dx, (dout @ w.T).reshape(x.shape))
    _close(dw, x.reshape(3, 8).T @ dout)
    _close(db, dout.sum(0))
    r, rcache = relu_forward(out)
    _close(r, np.maximum(out, 0))
    _close(relu_backward(dout, rcache), dout * (out > 0))
    y = np.array([0, 4, 2])
    loss, dscores = softmax_loss(out, y)
    loss_ref, dscores_ref = ref.softmax_loss(out, y)
    _close(loss, loss_ref)
    _close(dscores, dscores_ref)


def test_dropout_statistics_modes_and_seed():
    x = np.random.default_rng(0).normal(size=(500, 500)) + 10
    for p in (0.25, 0.4, 0.7):
        out, _ = dropout_forward(x, {"mode": "train", "p": p})
        frac = np.mean(out == 0)
        assert abs(frac - p) <= 4 * np.sqrt(p * (1 - p) / x.size)  # p is the DROP probability
        sigma = np.sqrt(np.mean(x ** 2) * p / (1 - p) / x.size)  # std of the mean of out
        assert abs(out.mean() - x.mean()) <= 4 * sigma
        np.testing.assert_array_equal(dropout_forward(x, {"mode": "test", "p": p})[0], x)
    a = dropout_forward(x, {"mode": "train", "p": 0.5, "seed": 123})[0]
    b = dropout_forward(x, {"mode": "train", "p": 0.5, "seed": 123})[0]
    c = dropout_forward(x, {"mode": "train", "p": 0.5})[0]
    d = dropout_forward(x, {"mode": "train", "p": 0.5})[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(c, d)  # without a seed, successive calls differ


def test_dropout_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 10)) + 10
    dout = rng.normal(size=x.shape)
    param = {"mode": "train", "p": 0.2, "seed": 123}
    _, cache = dropout_forward(x, param)
    dx = dropout_backward(dout, cache)
    numeric = eval_numerical_gradient_array(lambda xx: dropout_forward(xx, param)[0], x, dout)
    assert rel_error(dx, numeric) <= 1e-10
    param["mode"] = "test"
    np.testing.assert_array_equal(dropout_backward(dout, dropout_forward(x, param)[1]), dout)


@pytest.mark.parametrize("normalization", [None, "batchnorm", "layernorm"])
@pytest.mark.parametrize("reg", [0.0, 3.14])
def test_fcn_initial_loss_matches_numpy(normalization, reg):
    np.random.seed(231)
    n, d, h1, h2, c = 6, 15, 20, 30, 10
    X = np.random.randn(n, d)
    y = np.random.randint(c, size=(n,))
    model = FullyConnectedNet([h1, h2], input_dim=d, num_classes=c, reg=reg, weight_scale=5e-2,
                              dtype=np.float64, normalization=normalization)
    # The weights are numpy's global-RNG draws in layer order, as in the assignment.
    np.random.seed(231)
    np.random.randn(n, d), np.random.randint(c, size=(n,))
    np.testing.assert_array_equal(model.params["W1"], 5e-2 * np.random.randn(d, h1))
    loss, grads = model.loss(X, y)
    expected = ref.fcn_loss(model.params, X, y, 3, normalization, reg)
    assert abs(loss - expected) <= 1e-12 * abs(expected)
    assert sorted(grads) == sorted(model.params)


def test_fcn_use_batchnorm_spelling_and_scores_in_test_mode():
    np.random.seed(0)
    model = FullyConnectedNet([7], input_dim=4, num_classes=3, use_batchnorm=True,
                              dtype=np.float64)
    assert model.normalization == "batchnorm" and len(model.bn_params) == 1
    X = np.random.randn(5, 4)
    model.loss(X, np.array([0, 1, 2, 0, 1]))
    scores = model.loss(X)
    assert scores.shape == (5, 3) and model.bn_params[0]["mode"] == "test"
    with pytest.raises(ValueError, match="normalization"):
        FullyConnectedNet([7], normalization="groupnorm")


@pytest.mark.parametrize("normalization", [None, "batchnorm", "layernorm"])
def test_fcn_gradients_match_finite_differences(normalization):
    np.random.seed(231)
    n, d, h1, h2, c = 10, 8, 9, 7, 5
    X = np.random.randn(n, d)
    y = np.random.randint(c, size=(n,))
    model = FullyConnectedNet([h1, h2], input_dim=d, num_classes=c, reg=0.7, weight_scale=5e-2,
                              dtype=np.float64, normalization=normalization)
    _, grads = model.loss(X, y)
    for name in sorted(grads):
        numeric = eval_numerical_gradient(lambda _: model.loss(X, y)[0], model.params[name],
                                          verbose=False, h=1e-5)
        # Biases' gradients are small, so finite-difference noise is relatively larger for them.
        tol = {"W": 1e-4, "b": 1e-6}.get(name[0], 1e-7)
        assert rel_error(numeric, grads[name]) <= tol, name


def test_fcn_with_dropout_seed_is_deterministic():
    np.random.seed(0)
    X, y = np.random.randn(6, 5), np.array([0, 1, 2, 0, 1, 2])
    model = FullyConnectedNet([20, 20], input_dim=5, num_classes=3, dropout=0.5, seed=123,
                              dtype=np.float64)
    (l1, g1), (l2, g2) = model.loss(X, y), model.loss(X, y)
    assert l1 == l2 and all(np.array_equal(g1[k], g2[k]) for k in g1)
    unseeded = FullyConnectedNet([20, 20], input_dim=5, num_classes=3, dropout=0.5,
                                 dtype=np.float64)
    unseeded.params = model.params
    assert unseeded.loss(X, y)[0] != unseeded.loss(X, y)[0]


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="mode"):
        batchnorm_forward(np.ones((2, 2)), np.ones(2), np.zeros(2), {})
    with pytest.raises(ValueError, match="mode"):
        batchnorm_forward(np.ones((2, 2)), np.ones(2), np.zeros(2), {"mode": "eval"})
    with pytest.raises(ValueError, match="G must be"):
        spatial_groupnorm_forward(np.ones((2, 6, 2, 2)), np.ones(6), np.zeros(6), 4, {})


NOTEBOOK_CELL = """
np.random.seed(231)
N, D1, D2, D3 = 200, 50, 60, 3
W1 = np.random.randn(D1, D2)
W2 = np.random.randn(D2, D3)
bn_param = {'mode': 'train'}
gamma = np.ones(D3)
beta = np.zeros(D3)
for t in range(50):
  X = np.random.randn(N, D1)
  a = np.maximum(0, X.dot(W1)).dot(W2)
  batchnorm_forward(a, gamma, beta, bn_param)
bn_param['mode'] = 'test'
X = np.random.randn(N, D1)
a = np.maximum(0, X.dot(W1)).dot(W2)
a_norm, _ = batchnorm_forward(a, gamma, beta, bn_param)
print('After batch normalization (test-time):')
print('  means: ', a_norm.mean(axis=0))
print('  stds: ', a_norm.std(axis=0))
"""


def test_notebook_cell_runs_unchanged_and_prints_the_numpy_numbers(capsys):
    """A cell of the assignment's notebook, run as written after ``from jaxbn.cs231n import *``."""
    ours = {}
    exec("import numpy as np\nfrom jaxbn.cs231n import *\n" + NOTEBOOK_CELL, ours)
    printed = capsys.readouterr().out
    theirs = {"np": np, "batchnorm_forward": ref.batchnorm_forward}
    exec(NOTEBOOK_CELL, theirs)
    expected = capsys.readouterr().out
    _close(ours["a_norm"], theirs["a_norm"], 1e-12)
    # The printed numbers agree to the printed precision.
    assert printed.split("\n")[0] == expected.split("\n")[0]
    numbers = lambda s: np.array([float(t) for t in s.replace("[", " ").replace("]", " ").split()
                                  if t[0].isdigit() or t[0] == "-"])
    np.testing.assert_allclose(numbers(printed), numbers(expected), rtol=1e-6, atol=1e-8)
