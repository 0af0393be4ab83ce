"""cs231n assignment 2's layer API, running on jaxbn's core.

The functions keep the assignment's signatures and semantics (``bn_param`` dicts updated in place,
``(out, cache)`` forwards, ``(dx, dgamma, dbeta)`` backwards) so a notebook written for the numpy
assignment runs after ``from jaxbn.cs231n import *``. Inputs may be numpy or JAX arrays; outputs are
numpy arrays. The two batch norm backwards are the very rules jaxbn's ``custom_vjp`` registers
(:func:`jaxbn._normalize.graph_rule` and :func:`~jaxbn._normalize.alt_rule`) applied to the residuals
its forward saves; the other backwards are ``jax.vjp`` of the core layers.

The assignment checks gradients in float64. Enable it before creating any array::

    import jax
    jax.config.update("jax_enable_x64", True)

Without it, float64 inputs are computed in float32 and gradient checks lose their precision.
``eval_numerical_gradient``, ``eval_numerical_gradient_array`` and ``rel_error`` (the notebook's
helpers) are provided too.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _batch_norm, _checks, _layer_norm, nets
from jaxbn._batch_norm import BatchNormState
from jaxbn._dropout import dropout
from jaxbn._layout import layout
from jaxbn._normalize import Config, Residuals, _normalize_core_fwd, alt_rule, graph_rule

__all__ = [
    "affine_forward", "affine_backward", "relu_forward", "relu_backward", "softmax_loss",
    "batchnorm_forward", "batchnorm_backward", "batchnorm_backward_alt",
    "spatial_batchnorm_forward", "spatial_batchnorm_backward",
    "layernorm_forward", "layernorm_backward",
    "spatial_groupnorm_forward", "spatial_groupnorm_backward",
    "dropout_forward", "dropout_backward", "FullyConnectedNet",
    "eval_numerical_gradient", "eval_numerical_gradient_array", "rel_error",
]


def _np(*arrays):
    out = tuple(np.asarray(a) for a in arrays)
    return out if len(out) > 1 else out[0]


def _affine(x, w, b):
    return x.reshape(x.shape[0], -1) @ w + b


def affine_forward(x, w, b):
    """``out = x.reshape(N, D) @ w + b``; ``x`` ``(N, d_1, ..., d_k)``, ``w`` ``(D, M)``."""
    x, w, b = jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)
    return _np(_affine(x, w, b)), (x, w, b)


def affine_backward(dout, cache):
    """Returns ``(dx, dw, db)`` by ``jax.vjp`` of the affine forward."""
    _, pullback = jax.vjp(_affine, *cache)
    return _np(*pullback(jnp.asarray(dout)))


def relu_forward(x):
    x = jnp.asarray(x)
    return _np(jax.nn.relu(x)), x


def relu_backward(dout, cache):
    return _np(jax.vjp(jax.nn.relu, cache)[1](jnp.asarray(dout))[0])


def softmax_loss(x, y):
    """Mean softmax cross-entropy of scores ``x`` ``(N, C)`` for labels ``y``; returns
    ``(loss, dx)``."""
    loss, dx = jax.value_and_grad(nets.softmax_cross_entropy)(jnp.asarray(x), jnp.asarray(y))
    return float(loss), _np(dx)


class _NormCache(NamedTuple):
    """What a normalization forward hands to its backward."""

    config: Config | None  # train mode: the core's static configuration
    residuals: Residuals | None  # train mode: what the core's forward saved
    pullback: Any = None  # test mode: jax.vjp of the running-statistics forward
    shape: tuple[int, ...] = ()  # x's shape (group norm views x with its channels split)


_core_fwd = jax.jit(_normalize_core_fwd, static_argnums=3)


def _mode(param: dict, name: str) -> str:
    if "mode" not in param:
        raise ValueError(f"{name} must contain 'mode' ('train' or 'test'); got keys "
                         f"{sorted(param)}.")
    mode = param["mode"]
    if mode not in ("train", "test"):
        raise ValueError(f"Invalid forward batchnorm mode {mode!r}: {name}['mode'] must be "
                         f"'train' or 'test'.")
    return mode


def _batchnorm(x, gamma, beta, bn_param, image_layout):
    mode = _mode(bn_param, "bn_param")
    x = jnp.asarray(x)
    lay = layout(x.shape, "batch", axis=1, image_layout=image_layout)
    dtype = _checks.stat_dtype(x.dtype)
    zeros = np.zeros(lay.param_shape, dtype)
    state = BatchNormState(jnp.asarray(bn_param.get("running_mean", zeros)),
                           jnp.asarray(bn_param.get("running_var", zeros)))
    options = dict(momentum=bn_param.get("momentum", 0.9), eps=bn_param.get("eps", 1e-5))
    gamma, beta = jnp.asarray(gamma), jnp.asarray(beta)
    if mode == "train":
        p = _batch_norm.prepare(x, gamma, beta, state, lay, backward="alt", axis_name=None,
                                mask=None, **options)
        (out, mean, var), residuals = _core_fwd(p.x, p.gamma, p.beta, p.config)
        state = _batch_norm.new_state(p, mean, var)
        cache = _NormCache(p.config, residuals, shape=x.shape)
    else:
        out, pullback = jax.vjp(lambda x, g, b: _batch_norm._batch_norm(
            x, g, b, state, lay, train=False, backward="alt", axis_name=None, mask=None,
            **options)[0], x, gamma, beta)
        cache = _NormCache(None, None, pullback, x.shape)
    bn_param["running_mean"], bn_param["running_var"] = _np(*state)
    return _np(out), cache


def _norm_backward(dout, cache, rule, param_shape=None):
    if cache.pullback is not None:
        dx, dgamma, dbeta = cache.pullback(jnp.asarray(dout))
    else:
        dout = jnp.asarray(dout).reshape(cache.residuals.x.shape)
        dx, dgamma, dbeta = rule(cache.config, cache.residuals, dout)
    shape = (-1,) if param_shape is None else param_shape
    return _np(dx.reshape(cache.shape), dgamma.reshape(shape), dbeta.reshape(shape))


def batchnorm_forward(x, gamma, beta, bn_param):
    """Batch norm of ``(N, D)`` data; ``bn_param``: ``mode`` ('train'/'test', required), ``eps``
    (1e-5), ``momentum`` (0.9), ``running_mean``/``running_var`` (zeros by default), updated in
    place as ``momentum * running + (1 - momentum) * batch``. Returns ``(out, cache)``."""
    return _batchnorm(x, gamma, beta, bn_param, None)


def batchnorm_backward(dout, cache):
    """The staged backward through the computational graph: jaxbn's ``"graph"`` rule."""
    return _norm_backward(dout, cache, graph_rule)


def batchnorm_backward_alt(dout, cache):
    """The simplified closed-form backward: jaxbn's ``"alt"`` rule."""
    return _norm_backward(dout, cache, alt_rule)


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Batch norm of ``(N, C, H, W)`` data per channel; ``gamma``/``beta`` ``(C,)``."""
    return _batchnorm(x, gamma, beta, bn_param, "NCHW")


def spatial_batchnorm_backward(dout, cache):
    return _norm_backward(dout, cache, alt_rule)


def layernorm_forward(x, gamma, beta, ln_param):
    """Layer norm of ``(N, D)`` data over D; ``ln_param`` may hold ``eps``."""
    x = jnp.asarray(x)
    return _norm_forward(x, gamma, beta, layout(x.shape, "layer"), ln_param)


def _norm_forward(x, gamma, beta, lay, param):
    """Layer/group norm forward through the core's own forward, keeping its residuals."""
    xv, gv, bv, config = _layer_norm.prepare(x, jnp.asarray(gamma).reshape(lay.param_shape),
                                             jnp.asarray(beta).reshape(lay.param_shape), lay,
                                             float(param.get("eps", 1e-5)), "alt")
    (out, _, _), residuals = _core_fwd(xv, gv, bv, config)
    return _np(out.reshape(lay.shape)), _NormCache(config, residuals, shape=lay.shape)


def layernorm_backward(dout, cache):
    return _norm_backward(dout, cache, alt_rule)


def spatial_groupnorm_forward(x, gamma, beta, G, gn_param):
    """Group norm of ``(N, C, H, W)`` data with ``G`` groups; ``gamma``/``beta`` ``(1, C, 1, 1)``
    as the notebook passes them (``(C,)`` works too); ``gn_param`` may hold ``eps``."""
    x = jnp.asarray(x)
    channels = x.shape[1]
    if isinstance(G, bool) or not isinstance(G, (int, np.integer)) or G < 1 or channels % G:
        raise ValueError(f"G must be a positive divisor of the {channels} channels; got {G!r}.")
    lay = layout(x.shape, "group", image_layout="NCHW", groups=int(G))
    return _norm_forward(x, gamma, beta, lay, gn_param)


def spatial_groupnorm_backward(dout, cache):
    """Returns ``(dx, dgamma, dbeta)`` with dgamma/dbeta of shape ``(1, C, 1, 1)``."""
    return _norm_backward(dout, cache, alt_rule, (1, -1, 1, 1))


def _dropout_key(dropout_param):
    # With a seed, the mask is a deterministic function of it; without, a fresh seed is drawn from
    # numpy's global RNG, so successive calls differ and np.random.seed makes a run reproducible.
    seed = dropout_param["seed"] if "seed" in dropout_param else np.random.randint(2**31 - 1)
    return jax.random.key(int(seed))


def dropout_forward(x, dropout_param):
    """Inverted dropout; ``dropout_param``: ``p`` the probability of *dropping* a unit, ``mode``
    'train'/'test', optional ``seed``. Returns ``(out, cache)``."""
    p, mode = dropout_param["p"], dropout_param["mode"]
    if mode not in ("train", "test"):
        raise ValueError(f"dropout_param['mode'] must be 'train' or 'test'; got {mode!r}.")
    x = jnp.asarray(x)
    if mode == "test":
        return _np(x), (dropout_param, None)
    key = _dropout_key(dropout_param)
    out, pullback = jax.vjp(lambda x: dropout(key, x, rate=p, train=True), x)
    return _np(out), (dropout_param, pullback)


def dropout_backward(dout, cache):
    """``dout * mask / (1 - p)`` in train mode (the core's rule), ``dout`` in test mode."""
    dropout_param, pullback = cache
    if dropout_param["mode"] == "test" or pullback is None:
        return _np(jnp.asarray(dout))
    return _np(pullback(jnp.asarray(dout))[0])


@functools.partial(jax.jit, static_argnames=("train",))
def _fcn_loss_and_grads(params, state, x, y, key, reg, *, train):
    def objective(params):
        scores, new_state = nets.apply_mlp(params, state, x, train=train, key=key)
        return nets.softmax_cross_entropy(scores, y) + nets.l2_penalty(params, reg), new_state

    return jax.value_and_grad(objective, has_aux=True)(params)


class FullyConnectedNet:
    """cs231n's ``{affine - [batch/layer norm] - relu - [dropout]} x (L - 1) - affine - softmax``.

    Weights are ``weight_scale * np.random.randn(fan_in, fan_out)`` drawn from numpy's global RNG
    in layer order, as in the assignment, so a seeded construction gives its weights. ``dropout``
    is the probability of dropping a unit (0 disables it); ``use_batchnorm=True`` is the 2016-17
    spelling of ``normalization="batchnorm"``. ``loss(X)`` returns scores (test mode);
    ``loss(X, y)`` returns ``(loss, grads)`` with gradients by JAX through jaxbn's layers.
    """

    def __init__(self, hidden_dims, input_dim=3 * 32 * 32, num_classes=10, dropout=0,
                 use_batchnorm=False, normalization=None, reg=0.0, weight_scale=1e-2,
                 dtype=np.float32, seed=None):
        if use_batchnorm:
            if normalization not in (None, "batchnorm"):
                raise ValueError(f"use_batchnorm=True conflicts with normalization="
                                 f"{normalization!r}.")
            normalization = "batchnorm"
        if normalization not in nets.NORMALIZATIONS:
            raise ValueError(f"normalization must be one of None, 'batchnorm', 'layernorm'; "
                             f"got {normalization!r}.")
        self.normalization = normalization
        self.use_batchnorm = normalization == "batchnorm"
        self.use_dropout = dropout > 0
        self.reg = reg
        self.num_layers = 1 + len(hidden_dims)
        self.dtype = dtype
        self.params = {}
        dims = [input_dim, *hidden_dims, num_classes]
        for i in range(1, self.num_layers + 1):
            self.params[f"W{i}"] = weight_scale * np.random.randn(dims[i - 1], dims[i])
            self.params[f"b{i}"] = np.zeros(dims[i])
            if normalization is not None and i < self.num_layers:
                self.params[f"gamma{i}"] = np.ones(dims[i])
                self.params[f"beta{i}"] = np.zeros(dims[i])
        for name, value in self.params.items():
            self.params[name] = value.astype(dtype)
        self.dropout_param = {}
        if self.use_dropout:
            self.dropout_param = {"mode": "train", "p": dropout}
            if seed is not None:
                self.dropout_param["seed"] = seed
        self.bn_params = []
        if normalization is not None:
            self.bn_params = [{"mode": "train"} for _ in range(self.num_layers - 1)]

    def loss(self, X, y=None):
        mode = "test" if y is None else "train"
        if self.use_dropout:
            self.dropout_param["mode"] = mode
        for bn_param in self.bn_params:
            bn_param["mode"] = mode
        stat_dtype = _checks.stat_dtype(self.dtype)
        bn_states = ()
        if self.use_batchnorm:
            bn_states = tuple(BatchNormState(
                jnp.asarray(p.get("running_mean", np.zeros(self.params[f"b{i}"].shape)), stat_dtype),
                jnp.asarray(p.get("running_var", np.zeros(self.params[f"b{i}"].shape)), stat_dtype))
                for i, p in enumerate(self.bn_params, start=1))
        first = self.bn_params[0] if self.bn_params else {}
        state = nets.NetState(bn_states, self.normalization,
                              float(self.dropout_param.get("p", 0.0)) if self.use_dropout else 0.0,
                              float(first.get("momentum", 0.9)), float(first.get("eps", 1e-5)))
        params = {k: jnp.asarray(v) for k, v in self.params.items()}
        X = jnp.asarray(X, self.dtype)
        if y is None:
            return _np(nets.apply_mlp(params, state, X, train=False)[0])
        key = _dropout_key(self.dropout_param) if self.use_dropout else None
        (loss, new_state), grads = _fcn_loss_and_grads(params, state, X, jnp.asarray(y), key,
                                                       self.reg, train=True)
        for bn_param, bn in zip(self.bn_params, new_state.batch_norm):
            bn_param["running_mean"], bn_param["running_var"] = _np(*bn)
        return float(loss), {k: _np(v) for k, v in grads.items()}


def rel_error(x, y):
    """The notebook's relative error: ``max |x - y| / max(1e-8, |x| + |y|)``."""
    return np.max(np.abs(x - y) / (np.maximum(1e-8, np.abs(x) + np.abs(y))))


def _centered_differences(evaluate, x, h, combine, verbose=False):
    """Perturbs each entry of the numpy array ``x`` in place by +-h (restoring it) and stores
    ``combine(evaluate(x + h e_i), evaluate(x - h e_i)) / (2 h)``."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index
        old = x[ix]
        x[ix] = old + h
        plus = evaluate(x)
        x[ix] = old - h
        minus = evaluate(x)
        x[ix] = old
        grad[ix] = combine(plus, minus) / (2 * h)
        if verbose:
            print(ix, grad[ix])
        it.iternext()
    return grad


def eval_numerical_gradient(f, x, verbose=True, h=1e-5):
    """Centered finite-difference gradient of the scalar ``f`` at the numpy array ``x`` (modified
    in place and restored), as in cs231n's ``gradient_check``."""
    return _centered_differences(f, x, h, lambda plus, minus: plus - minus, verbose)


def eval_numerical_gradient_array(f, x, df, h=1e-5):
    """Centered finite differences of ``sum(f(x) * df)`` w.r.t. the numpy array ``x``; the outputs
    are differenced before the sum, so two large sums never cancel."""
    return _centered_differences(lambda a: np.array(f(a), copy=True), x, h,
                                 lambda plus, minus: np.sum((plus - minus) * df))
