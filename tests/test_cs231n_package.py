"""jaxbn.cs231n as the assignment's package: imports, optimizers, Solver, every dropout spelling,
the float64 warning and the CIFAR-10 loader's errors."""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import numpy_cs231n as ref


def _rel_error(x, y):  # the notebook's own helper, written here again on purpose
    return np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y)))


@pytest.mark.parametrize("module,names", [
    ("jaxbn.cs231n.layers", ["batchnorm_forward", "batchnorm_backward_alt", "dropout_forward"]),
    ("jaxbn.cs231n.layer_utils", ["affine_relu_forward", "affine_relu_backward",
                                  "affine_bn_relu_forward", "affine_ln_relu_backward"]),
    ("jaxbn.cs231n.optim", ["sgd", "sgd_momentum", "rmsprop", "adam"]),
    ("jaxbn.cs231n.solver", ["Solver"]),
    ("jaxbn.cs231n.classifiers.fc_net", ["FullyConnectedNet"]),
    ("jaxbn.cs231n.gradient_check", ["eval_numerical_gradient", "eval_numerical_gradient_array",
                                     "grad_check_sparse"]),
    ("jaxbn.cs231n.data_utils", ["get_CIFAR10_data", "load_CIFAR10"]),
])
def test_the_notebooks_imports_work_with_the_prefix_replaced(module, names):
    imported = importlib.import_module(module)
    assert all(callable(getattr(imported, n)) for n in names)
    star = {}
    exec("from jaxbn.cs231n import *", star)
    assert {"Solver", "FullyConnectedNet", "adam", "batchnorm_forward", "rel_error"} <= set(star)


def _notebook_arrays():
    n, d = 4, 5
    w = np.linspace(-0.4, 0.6, num=n * d).reshape(n, d)
    dw = np.linspace(-0.6, 0.4, num=n * d).reshape(n, d)
    return w, dw, n, d


def test_sgd_momentum_matches_the_notebook_and_the_math():
    from jaxbn.cs231n.optim import sgd_momentum

    w, dw, n, d = _notebook_arrays()
    v = np.linspace(0.6, 0.9, num=n * d).reshape(n, d)
    next_w, config = sgd_momentum(w, dw, {"learning_rate": 1e-3, "velocity": v})
    # The notebook's printed first and last entries: 0.1406 and 1.4096.
    assert abs(next_w[0, 0] - 0.1406) < 1e-12 and abs(next_w[-1, -1] - 1.4096) < 1e-12
    expected_w, expected_v = ref.momentum_step(w, dw, 1e-3, 0.9, v)
    assert _rel_error(next_w, expected_w) < 1e-8
    assert _rel_error(config["velocity"], expected_v) < 1e-8


def test_rmsprop_and_adam_match_the_math_over_several_steps():
    from jaxbn.cs231n.optim import adam, rmsprop

    w0, dw, n, d = _notebook_arrays()
    cache = np.linspace(0.6, 0.9, num=n * d).reshape(n, d)
    w, config = w0, {"learning_rate": 1e-2, "cache": cache.copy()}
    ref_w, ref_cache = w0, cache.copy()
    m = np.linspace(0.6, 0.9, num=n * d).reshape(n, d)
    v = np.linspace(0.7, 0.5, num=n * d).reshape(n, d)
    wa, config_a = w0, {"learning_rate": 1e-2, "m": m.copy(), "v": v.copy(), "t": 5}
    ref_a = (w0, m.copy(), v.copy(), 5)
    for step in range(3):
        w, config = rmsprop(w, dw * (step + 1), config)
        ref_w, ref_cache = ref.rmsprop_step(ref_w, dw * (step + 1), 1e-2, 0.99, 1e-8,
                                            ref_cache)
        wa, config_a = adam(wa, dw * (step + 1), config_a)
        ref_a = ref.adam_step(ref_a[0], dw * (step + 1), 1e-2, 0.9, 0.999, 1e-8, *ref_a[1:])
    assert _rel_error(w, ref_w) < 1e-7 and _rel_error(config["cache"], ref_cache) < 1e-7
    assert _rel_error(wa, ref_a[0]) < 1e-7 and config_a["t"] == 8  # incremented before use
    assert _rel_error(config_a["m"], ref_a[1]) < 1e-7 and _rel_error(config_a["v"], ref_a[2]) < 1e-7


def test_optimizer_defaults_are_the_assignments():
    from jaxbn.cs231n import optim

    w = np.ones(3)
    assert optim.sgd(w, w)[1] == {"learning_rate": 1e-2}
    assert {k: v for k, v in optim.sgd_momentum(w, w)[1].items() if k != "velocity"} == {
        "learning_rate": 1e-2, "momentum": 0.9}
    assert {k: v for k, v in optim.rmsprop(w, w)[1].items() if k != "cache"} == {
        "learning_rate": 1e-2, "decay_rate": 0.99, "epsilon": 1e-8}
    config = optim.adam(w, w)[1]
    assert (config["learning_rate"], config["beta1"], config["beta2"], config["epsilon"],
            config["t"]) == (1e-3, 0.9, 0.999, 1e-8, 1)


def _small_data(n_train=120, n_val=40, d=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, d)) * 2
    y = rng.integers(0, 3, n_train + n_val)
    x = centers[y] + rng.normal(size=(n_train + n_val, d))
    return {"X_train": x[:n_train], "y_train": y[:n_train], "X_val": x[n_train:],
            "y_val": y[n_train:]}


def test_solver_histories_prints_decay_and_best_parameters(capsys):
    from jaxbn.cs231n import FullyConnectedNet, Solver

    np.random.seed(0)
    model = FullyConnectedNet([20], input_dim=12, num_classes=3, weight_scale=1e-1)
    solver = Solver(model, _small_data(), update_rule="sgd_momentum",
                    optim_config={"learning_rate": 1e-2}, lr_decay=0.5, batch_size=20,
                    num_epochs=3, print_every=4, verbose=True)
    solver.train()
    printed = capsys.readouterr().out.splitlines()
    assert len(solver.loss_history) == 18  # 3 epochs x 6 iterations
    assert len(solver.train_acc_history) == len(solver.val_acc_history) == 4  # first + 3 epochs
    assert printed[0].startswith("(Iteration 1 / 18) loss: ")
    assert "(Epoch 0 / 3) train acc: " in printed[1] and "; val_acc: " in printed[1]
    assert sum(line.startswith("(Iteration") for line in printed) == 5  # t = 0, 4, 8, 12, 16
    assert printed[-1].startswith("(Epoch 3 / 3)")
    assert solver.epoch == 3
    for config in solver.optim_configs.values():
        assert config["learning_rate"] == pytest.approx(1e-2 * 0.5 ** 3)
    assert set(solver.optim_configs) == set(model.params) and "velocity" in config
    assert solver.best_val_acc == max(solver.val_acc_history)
    assert all(np.array_equal(model.params[k], solver.best_params[k]) for k in model.params)
    assert solver.loss_history[-1] < solver.loss_history[0]
    assert solver.check_accuracy(solver.X_val, solver.y_val) == solver.best_val_acc


def test_solver_works_with_any_model_of_the_assignments_contract():
    from jaxbn.cs231n import Solver

    class Softmax:  # a plain numpy model: params + loss(X, y=None)
        def __init__(self):
            self.params = {"W": np.zeros((12, 3))}

        def loss(self, X, y=None):
            scores = X @ self.params["W"]
            if y is None:
                return scores
            p = np.exp(scores - scores.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            loss = -np.log(p[np.arange(len(y)), y]).mean()
            p[np.arange(len(y)), y] -= 1
            return loss, {"W": X.T @ p / len(y)}

    np.random.seed(1)
    solver = Solver(Softmax(), _small_data(), update_rule="adam", num_epochs=2, batch_size=30,
                    verbose=False, optim_config={"learning_rate": 1e-1})
    solver.train()
    assert solver.best_val_acc > 0.8


def test_solver_rejects_unknown_keywords_and_update_rules():
    from jaxbn.cs231n import FullyConnectedNet, Solver

    model = FullyConnectedNet([5], input_dim=12, num_classes=3)
    with pytest.raises(ValueError, match="Unrecognized arguments learning_rate"):
        Solver(model, _small_data(), learning_rate=1e-3)
    with pytest.raises(ValueError, match='Invalid update_rule "adamw"'):
        Solver(model, _small_data(), update_rule="adamw")


def test_solver_checkpoints_are_safe_files(tmp_path):
    from jaxbn import training
    from jaxbn.cs231n import FullyConnectedNet, Solver

    np.random.seed(0)
    model = FullyConnectedNet([5], input_dim=12, num_classes=3)
    solver = Solver(model, _small_data(), num_epochs=1, batch_size=60, verbose=False,
                    checkpoint_name=str(tmp_path / "fc"))
    solver.train()
    tree, meta = training.load_checkpoint(tmp_path / "fc_epoch_1.npz", {"params": model.params})
    assert meta["epoch"] == 1 and len(meta["loss_history"]) == 2
    assert set(tree["params"]) == set(model.params)


def test_the_three_dropout_spellings():
    from jaxbn.cs231n import FullyConnectedNet

    old = FullyConnectedNet([5], input_dim=4, num_classes=2, dropout=0.25)  # 2016-17: drop
    new = FullyConnectedNet([5], input_dim=4, num_classes=2, dropout_keep_ratio=0.75)  # 2021+
    assert old.dropout_param["p"] == pytest.approx(0.25) == new.dropout_param["p"]
    assert not FullyConnectedNet([5], input_dim=4, num_classes=2, dropout_keep_ratio=1).use_dropout
    assert not FullyConnectedNet([5], input_dim=4, num_classes=2, dropout=0).use_dropout
    with pytest.raises(ValueError, match="dropout=1 would drop every unit.*2018-20.*keep "
                                         "probability.*dropout_keep_ratio="):
        FullyConnectedNet([5], input_dim=4, num_classes=2, dropout=1)  # 2018-20: "off"
    with pytest.raises(ValueError, match="not both"):
        FullyConnectedNet([5], input_dim=4, num_classes=2, dropout=0.5, dropout_keep_ratio=0.5)
    with pytest.raises(ValueError, match="dropout_keep_ratio"):
        FullyConnectedNet([5], input_dim=4, num_classes=2, dropout_keep_ratio=0.0)


def test_float64_without_x64_warns_once_with_the_line_to_add():
    code = ("import warnings, numpy as np\nfrom jaxbn.cs231n import batchnorm_forward\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    for _ in range(3):\n"
            "        batchnorm_forward(np.random.randn(4, 3), np.ones(3), np.zeros(3),"
            " {'mode': 'train'})\n"
            "print(len(w)); print(w[0].message)\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env).stdout.splitlines()
    assert out[0] == "1"
    assert 'jax.config.update("jax_enable_x64", True)' in out[1]


def test_cifar10_data_errors_name_the_folder_and_refuse_code(tmp_path):
    from jaxbn.cs231n.data_utils import get_CIFAR10_data

    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*cifar-10-batches-py"):
        get_CIFAR10_data(cifar10_dir=str(tmp_path / "nowhere"))
    root = tmp_path / "cifar"
    root.mkdir()
    sentinel = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps({"data": RunsCode(), "labels": [0]}))
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR-10 python batch.*not "
                                         "allowed"):
        get_CIFAR10_data(cifar10_dir=str(root))
    assert not sentinel.exists()


NOTEBOOK_BN_CELL = """
import numpy as np
from jaxbn.cs231n.classifiers.fc_net import FullyConnectedNet
from jaxbn.cs231n.solver import Solver

np.random.seed(231)
hidden_dims = [100, 100, 100, 100, 100]
weight_scale = 2e-2
bn_model = FullyConnectedNet(hidden_dims, input_dim=64, weight_scale=weight_scale,
                             normalization='batchnorm')
model = FullyConnectedNet(hidden_dims, input_dim=64, weight_scale=weight_scale,
                          normalization=None)
print('Solver with batch norm:')
bn_solver = Solver(bn_model, small_data, num_epochs=10, batch_size=50, update_rule='adam',
                   optim_config={'learning_rate': 1e-3}, verbose=True, print_every=20)
bn_solver.train()
print('Solver without batch norm:')
solver = Solver(model, small_data, num_epochs=10, batch_size=50, update_rule='adam',
                optim_config={'learning_rate': 1e-3}, verbose=True, print_every=20)
solver.train()
"""


@pytest.mark.slow
def test_notebook_batchnorm_for_deep_networks_cell_on_digits(capsys):
    """The BatchNormalization notebook's cell, cs231n. -> jaxbn.cs231n., CIFAR-10 -> digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data - digits.data.mean(0)) / (digits.data.std(0) + 1e-3)
    small_data = {"X_train": x[:1000], "y_train": digits.target[:1000],
                  "X_val": x[1000:1400], "y_val": digits.target[1000:1400]}
    scope = {"small_data": small_data}
    exec(NOTEBOOK_BN_CELL, scope)
    bn_solver, solver = scope["bn_solver"], scope["solver"]
    printed = capsys.readouterr().out
    assert "(Iteration 1 / 200) loss:" in printed and "(Epoch 10 / 10) train acc:" in printed
    assert len(bn_solver.loss_history) == len(solver.loss_history) == 200
    assert len(bn_solver.train_acc_history) == 11
    # Batch norm trains the deep net better, as the notebook's plots show.
    assert bn_solver.train_acc_history[3] > solver.train_acc_history[3] + 0.2
    assert bn_solver.best_val_acc > solver.best_val_acc
    assert np.mean(bn_solver.loss_history[-20:]) < np.mean(solver.loss_history[-20:])


def test_the_timing_cell_measures_the_derivations_not_compilation():
    """The notebook times batchnorm_backward vs _alt with time.time(): the forward has already
    compiled both rules for this shape, so neither backward call compiles."""
    from jaxbn.cs231n import layers

    x = np.random.randn(37, 11)
    _, cache = layers.batchnorm_forward(x, np.ones(11), np.zeros(11), {"mode": "train"})
    sizes = {name: rule._cache_size() for name, rule in layers._RULES.items()}
    dout = np.random.randn(37, 11)
    layers.batchnorm_backward(dout, cache)
    layers.batchnorm_backward_alt(dout, cache)
    assert {name: rule._cache_size() for name, rule in layers._RULES.items()} == sizes


def test_grad_check_sparse_reports_small_errors_for_a_right_gradient_only(capsys):
    from jaxbn.cs231n.gradient_check import grad_check_sparse

    np.random.seed(0)
    x = np.random.randn(4, 5)
    f = lambda a: float(np.sum(a ** 3))
    right = grad_check_sparse(f, x, 3 * x ** 2, num_checks=6)
    wrong = grad_check_sparse(f, x, 2 * x ** 2, num_checks=6)
    assert max(right) < 1e-8 and min(wrong) > 0.1
    assert capsys.readouterr().out.count("relative error:") == 12
    np.testing.assert_array_equal(x, np.random.RandomState(0).randn(4, 5))  # x restored


def test_integer_gamma_cell_of_the_convolutional_networks_notebook():
    """``gamma, beta = np.asarray([3, 4, 5]), np.asarray([6, 7, 8])``: means (6, 7, 8), stds
    (3, 4, 5), as the notebook prints them."""
    from jaxbn.cs231n.layers import spatial_batchnorm_forward

    np.random.seed(231)
    x = 4 * np.random.randn(2, 3, 4, 5) + 10
    out, _ = spatial_batchnorm_forward(x, np.asarray([3, 4, 5]), np.asarray([6, 7, 8]),
                                       {"mode": "train"})
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), [6, 7, 8], atol=1e-8)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), [3, 4, 5], rtol=1e-6)


def test_fully_connected_net_takes_the_backward_rule(monkeypatch):
    """``backward=`` reaches the batch norms inside ``loss``: the staged rule runs, and its
    gradients are the closed-form rule's."""
    from jaxbn import _normalize
    from jaxbn.cs231n.classifiers.fc_net import FullyConnectedNet

    calls = []
    graph_rule = _normalize.graph_rule
    monkeypatch.setattr(_normalize, "graph_rule",
                        lambda *a: calls.append(1) or graph_rule(*a))
    grads = {}
    for backward in ("alt", "graph"):
        np.random.seed(0)
        model = FullyConnectedNet([7, 6], input_dim=5, num_classes=3, normalization="batchnorm",
                                  dtype=np.float64, backward=backward)
        x, y = np.random.randn(9, 5), np.array([0, 1, 2] * 3)
        grads[backward] = model.loss(x, y)[1]
    assert len(calls) == 2  # traced once per batch norm layer, for "graph" only
    for name in grads["alt"]:
        np.testing.assert_allclose(grads["graph"][name], grads["alt"][name], rtol=1e-9,
                                   atol=1e-12)
    with pytest.raises(ValueError, match="backward must be one of"):
        FullyConnectedNet([4], input_dim=5, backward="numpy")
