"""cs231n assignment 2's layers (``cs231n/layers.py``), running on jaxbn's core.

The functions keep the assignment's signatures and semantics (``bn_param`` dicts updated in place,
``(out, cache)`` forwards, ``(dx, dgamma, dbeta)`` backwards). Inputs may be numpy or JAX arrays;
outputs are numpy arrays. The two batch norm backwards are the very rules jaxbn's ``custom_vjp``
registers (:func:`jaxbn._rules.graph_rule` and :func:`~jaxbn._rules.alt_rule`), jitted,
applied to the residuals its forward saves; the other backwards are ``jax.vjp`` of the core layers.

``dropout_forward``'s ``p`` is the probability of *dropping* a unit (the 2016-17 assignment); the
2018+ assignments use ``p`` as the keep probability, which ``jaxbn.cs231n.set_dropout_p("keep")``
selects (see :mod:`jaxbn.cs231n` for the differences).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _batch_norm, _checks, _layer_norm, _losses
from jaxbn._batch_norm import BatchNormState
from jaxbn._dropout import dropout
from jaxbn._layout import layout
from jaxbn._normalize import _normalize_core_fwd
from jaxbn._rules import Config, Residuals, alt_rule, graph_rule
from jaxbn.cs231n._dropout_p import drop_rate

__all__ = [
    "affine_forward", "affine_backward", "relu_forward", "relu_backward", "softmax_loss",
    "batchnorm_forward", "batchnorm_backward", "batchnorm_backward_alt",
    "spatial_batchnorm_forward", "spatial_batchnorm_backward",
    "layernorm_forward", "layernorm_backward",
    "spatial_groupnorm_forward", "spatial_groupnorm_backward",
    "dropout_forward", "dropout_backward",
]

_FLOAT64_WARNED = False


def _jnp(a: Any) -> jax.Array:
    """``jnp.asarray``, warning once when float64 data meets JAX with float64 off."""
    global _FLOAT64_WARNED
    if (not _FLOAT64_WARNED and not jax.config.read("jax_enable_x64")
            and getattr(a, "dtype", None) == np.float64):
        _FLOAT64_WARNED = True
        warnings.warn(
            "float64 arrays reached jaxbn.cs231n, but JAX's float64 is off, so they are computed "
            "in float32 and the notebook's gradient checks report errors near 1. Add the line "
            "jax.config.update(\"jax_enable_x64\", True) at the top of the notebook (before any "
            "array is created) and rerun it.", UserWarning, stacklevel=3)
    return jnp.asarray(a)


def _np(*arrays):
    out = tuple(np.asarray(a) for a in arrays)
    return out if len(out) > 1 else out[0]


def _affine(x, w, b):
    return x.reshape(x.shape[0], -1) @ w + b


def affine_forward(x, w, b):
    """``out = x.reshape(N, D) @ w + b``; ``x`` ``(N, d_1, ..., d_k)``, ``w`` ``(D, M)``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import affine_forward
      >>> out, cache = affine_forward(np.ones((2, 3, 4), np.float32), np.ones((12, 5), np.float32),
      ...                             np.zeros(5, np.float32))
      >>> out.shape, float(out[0, 0])
      ((2, 5), 12.0)
    """
    x, w, b = _jnp(x), _jnp(w), _jnp(b)
    return _np(_affine(x, w, b)), (x, w, b)


def affine_backward(dout, cache):
    """Returns ``(dx, dw, db)`` by ``jax.vjp`` of the affine forward.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import affine_backward, affine_forward
      >>> x, w = np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)
      >>> b = np.zeros(4, np.float32)
      >>> dx, dw, db = affine_backward(np.ones((2, 4), np.float32), affine_forward(x, w, b)[1])
      >>> dx.shape, dw.shape, db.tolist()
      ((2, 3), (3, 4), [2.0, 2.0, 2.0, 2.0])
    """
    _, pullback = jax.vjp(_affine, *cache)
    return _np(*pullback(_jnp(dout)))


def relu_forward(x):
    """``max(0, x)``; returns ``(out, cache)``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import relu_forward
      >>> relu_forward(np.array([-1.0, 2.0], np.float32))[0].tolist()
      [0.0, 2.0]
    """
    x = _jnp(x)
    return _np(jax.nn.relu(x)), x


def relu_backward(dout, cache):
    """``dout`` where the forward's input was positive, 0 elsewhere.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import relu_backward, relu_forward
      >>> _, cache = relu_forward(np.array([-1.0, 2.0], np.float32))
      >>> relu_backward(np.array([5.0, 5.0], np.float32), cache).tolist()
      [0.0, 5.0]
    """
    return _np(jax.vjp(jax.nn.relu, cache)[1](_jnp(dout))[0])


def softmax_loss(x, y):
    """Mean softmax cross-entropy of scores ``x`` ``(N, C)`` for labels ``y``; returns
    ``(loss, dx)``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import softmax_loss
      >>> loss, dx = softmax_loss(np.zeros((4, 10), np.float32), np.array([0, 1, 2, 3]))
      >>> round(loss, 4), dx.shape  # uniform scores: log(10)
      (2.3026, (4, 10))
    """
    loss, dx = jax.value_and_grad(_losses.softmax_cross_entropy)(_jnp(x), _jnp(y))
    return float(loss), _np(dx)


class _NormCache(NamedTuple):
    """What a normalization forward hands to its backward."""

    config: Config | None  # train mode: the core's static configuration
    residuals: Residuals | None  # train mode: what the core's forward saved
    pullback: Any = None  # test mode: jax.vjp of the running-statistics forward
    shape: tuple[int, ...] = ()  # x's shape (group norm views x with its channels split)


_core_fwd = jax.jit(_normalize_core_fwd, static_argnums=4)
# The two derivations, compiled. The notebook times them with time.time(): each is compiled and
# run once when a forward first meets a new shape, so that its timing cell measures the
# derivations, not XLA's compilation.
_RULES = {"graph": jax.jit(graph_rule, static_argnums=0),
          "alt": jax.jit(alt_rule, static_argnums=0)}
_WARM: set = set()


def _warm_rules(config: Config, residuals: Residuals) -> None:
    signature = (config, residuals.x.shape, residuals.x.dtype.name, residuals.gamma.dtype.name)
    if signature not in _WARM:
        _WARM.add(signature)
        dy = jnp.zeros(residuals.x.shape, residuals.x.dtype)
        for rule in _RULES.values():
            jax.block_until_ready(rule(config, residuals, dy))


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
    x = _jnp(x)
    lay = layout(x.shape, "batch", axis=1, image_layout=image_layout)
    dtype = _checks.stat_dtype(x.dtype)
    zeros = np.zeros(lay.param_shape, dtype)
    state = BatchNormState(_jnp(bn_param.get("running_mean", zeros)),
                           _jnp(bn_param.get("running_var", zeros)))
    options = dict(momentum=bn_param.get("momentum", 0.9), eps=bn_param.get("eps", 1e-5))
    gamma, beta = _jnp(gamma), _jnp(beta)
    if mode == "train":
        p = _batch_norm.prepare(x, gamma, beta, state, lay, backward="alt", axis_name=None,
                                mask=None, **options)
        (out, mean, var), residuals = _core_fwd(p.x, p.gamma, p.beta, None, p.config)
        _warm_rules(p.config, residuals)
        state = _batch_norm.new_state(p, mean, var)
        cache = _NormCache(p.config, residuals, shape=x.shape)
    else:
        out, pullback = jax.vjp(lambda x, g, b: _batch_norm._batch_norm(
            x, g, b, state, lay, train=False, backward="alt", axis_name=None, mask=None,
            **options)[0], x, gamma, beta)
        cache = _NormCache(None, None, pullback, x.shape)
    bn_param["running_mean"], bn_param["running_var"] = _np(state.mean, state.var)
    return _np(out), cache


def _norm_backward(dout, cache, rule, param_shape=None):
    if cache.pullback is not None:
        dx, dgamma, dbeta = cache.pullback(_jnp(dout))
    else:
        dout = _jnp(dout).reshape(cache.residuals.x.shape)
        dx, dgamma, dbeta = _RULES[rule](cache.config, cache.residuals, dout)
    shape = (-1,) if param_shape is None else param_shape
    return _np(dx.reshape(cache.shape), dgamma.reshape(shape), dbeta.reshape(shape))


def batchnorm_forward(x, gamma, beta, bn_param):
    """Batch norm of ``(N, D)`` data; ``bn_param``: ``mode`` ('train'/'test', required), ``eps``
    (1e-5), ``momentum`` (0.9), ``running_mean``/``running_var`` (zeros by default), updated in
    place as ``momentum * running + (1 - momentum) * batch``. Returns ``(out, cache)``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import batchnorm_forward
      >>> x = 5.0 * np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32) + 12.0
      >>> bn_param = {"mode": "train"}
      >>> out, cache = batchnorm_forward(x, np.ones(3), np.zeros(3), bn_param)
      >>> np.allclose(out.mean(0), 0, atol=1e-5), np.allclose(out.std(0), 1, atol=1e-3)
      (True, True)
      >>> np.allclose(bn_param["running_mean"], 0.1 * x.mean(0), rtol=1e-5)  # updated in place
      True
    """
    return _batchnorm(x, gamma, beta, bn_param, None)


def batchnorm_backward(dout, cache):
    """The staged backward through the computational graph: jaxbn's ``"graph"`` rule.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import (batchnorm_backward, batchnorm_backward_alt,
      ...                                  batchnorm_forward)
      >>> rng = np.random.default_rng(0)
      >>> x, dout = rng.standard_normal((8, 3)), rng.standard_normal((8, 3))
      >>> _, cache = batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "train"})
      >>> dx, dgamma, dbeta = batchnorm_backward(dout, cache)
      >>> np.allclose(dx, batchnorm_backward_alt(dout, cache)[0], atol=1e-5)  # the two derivations
      True
    """
    return _norm_backward(dout, cache, "graph")


def batchnorm_backward_alt(dout, cache):
    """The simplified closed-form backward: jaxbn's ``"alt"`` rule.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import batchnorm_backward_alt, batchnorm_forward
      >>> rng = np.random.default_rng(0)
      >>> x, dout = rng.standard_normal((8, 3)), rng.standard_normal((8, 3))
      >>> _, cache = batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "train"})
      >>> dx, dgamma, dbeta = batchnorm_backward_alt(dout, cache)
      >>> dx.shape, dgamma.shape, bool(np.allclose(dbeta, dout.sum(0), atol=1e-5))
      ((8, 3), (3,), True)
    """
    return _norm_backward(dout, cache, "alt")


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Batch norm of ``(N, C, H, W)`` data per channel; ``gamma``/``beta`` ``(C,)``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import spatial_batchnorm_forward
      >>> x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
      >>> out, _ = spatial_batchnorm_forward(x, np.asarray([3, 4, 5]), np.asarray([6, 7, 8]),
      ...                                    {"mode": "train"})
      >>> np.round(out.mean(axis=(0, 2, 3)), 4).tolist()
      [6.0, 7.0, 8.0]
    """
    return _batchnorm(x, gamma, beta, bn_param, "NCHW")


def spatial_batchnorm_backward(dout, cache):
    """Returns ``(dx, dgamma, dbeta)`` of :func:`spatial_batchnorm_forward` (the ``\"alt\"`` rule).

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import spatial_batchnorm_backward, spatial_batchnorm_forward
      >>> x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
      >>> _, cache = spatial_batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "train"})
      >>> dx, dgamma, dbeta = spatial_batchnorm_backward(np.ones_like(x), cache)
      >>> dx.shape, bool(np.allclose(dx, 0, atol=1e-5)), dbeta.tolist()  # constant dout: dx = 0
      ((4, 3, 5, 5), True, [100.0, 100.0, 100.0])
    """
    return _norm_backward(dout, cache, "alt")


def layernorm_forward(x, gamma, beta, ln_param):
    """Layer norm of ``(N, D)`` data over D; ``ln_param`` may hold ``eps``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import layernorm_forward
      >>> x = np.array([[1.0, 2.0, 3.0]], np.float32)
      >>> out, _ = layernorm_forward(x, np.ones(3), np.zeros(3), {})
      >>> np.round(out.astype(np.float64), 3).tolist()
      [[-1.225, 0.0, 1.225]]
    """
    x = _jnp(x)
    return _norm_forward(x, gamma, beta, layout(x.shape, "layer"), ln_param)


def _norm_forward(x, gamma, beta, lay, param):
    """Layer/group norm forward through the core's own forward, keeping its residuals."""
    xv, gv, bv, config = _layer_norm.prepare(x, _jnp(gamma).reshape(lay.param_shape),
                                             _jnp(beta).reshape(lay.param_shape), lay,
                                             float(param.get("eps", 1e-5)), "alt")
    (out, _, _), residuals = _core_fwd(xv, gv, bv, None, config)
    return _np(out.reshape(lay.shape)), _NormCache(config, residuals, shape=lay.shape)


def layernorm_backward(dout, cache):
    """Returns ``(dx, dgamma, dbeta)`` of :func:`layernorm_forward` (the ``\"alt\"`` rule).

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import layernorm_backward, layernorm_forward
      >>> x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
      >>> _, cache = layernorm_forward(x, np.ones(5), np.zeros(5), {})
      >>> dx, dgamma, dbeta = layernorm_backward(np.ones_like(x), cache)
      >>> bool(np.allclose(dx, 0, atol=1e-5)), dbeta.tolist()  # constant dout over a row: dx = 0
      (True, [4.0, 4.0, 4.0, 4.0, 4.0])
    """
    return _norm_backward(dout, cache, "alt")


def spatial_groupnorm_forward(x, gamma, beta, G, gn_param):
    """Group norm of ``(N, C, H, W)`` data with ``G`` groups; ``gamma``/``beta`` ``(1, C, 1, 1)``
    as the notebook passes them (``(C,)`` works too); ``gn_param`` may hold ``eps``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import spatial_groupnorm_forward
      >>> x = np.random.default_rng(0).standard_normal((2, 6, 4, 4)).astype(np.float32)
      >>> gamma, beta = np.ones((1, 6, 1, 1)), np.zeros((1, 6, 1, 1))  # the notebook's shapes
      >>> out, _ = spatial_groupnorm_forward(x, gamma, beta, 2, {})
      >>> groups = out.reshape(2, 2, -1)  # (example, group, values)
      >>> bool(np.allclose(groups.mean(-1), 0, atol=1e-5))
      True
    """
    x = _jnp(x)
    channels = x.shape[1]
    if isinstance(G, bool) or not isinstance(G, (int, np.integer)) or G < 1 or channels % G:
        raise ValueError(f"G must be a positive divisor of the {channels} channels; got {G!r}.")
    lay = layout(x.shape, "group", image_layout="NCHW", groups=int(G))
    return _norm_forward(x, gamma, beta, lay, gn_param)


def spatial_groupnorm_backward(dout, cache):
    """Returns ``(dx, dgamma, dbeta)`` with dgamma/dbeta of shape ``(1, C, 1, 1)``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import spatial_groupnorm_backward, spatial_groupnorm_forward
      >>> x = np.random.default_rng(0).standard_normal((2, 6, 4, 4)).astype(np.float32)
      >>> gamma, beta = np.ones((1, 6, 1, 1)), np.zeros((1, 6, 1, 1))
      >>> _, cache = spatial_groupnorm_forward(x, gamma, beta, 3, {})
      >>> dx, dgamma, dbeta = spatial_groupnorm_backward(np.ones_like(x), cache)
      >>> dx.shape, dgamma.shape
      ((2, 6, 4, 4), (1, 6, 1, 1))
    """
    return _norm_backward(dout, cache, "alt", (1, -1, 1, 1))


def _dropout_key(dropout_param):
    # With a seed, the mask is a deterministic function of it; without, a fresh seed is drawn from
    # numpy's global RNG, so successive calls differ and np.random.seed makes a run reproducible.
    seed = dropout_param["seed"] if "seed" in dropout_param else np.random.randint(2**31 - 1)
    return jax.random.key(int(seed))


def dropout_forward(x, dropout_param):
    """Inverted dropout; ``dropout_param``: ``p`` the probability of *dropping* a unit (of
    *keeping* one after ``jaxbn.cs231n.set_dropout_p("keep")``, as in the 2018+ assignment),
    ``mode`` 'train'/'test', optional ``seed``. Returns ``(out, cache)``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import dropout_forward
      >>> x = np.ones((100, 100), np.float32)
      >>> out, _ = dropout_forward(x, {"p": 0.25, "mode": "train", "seed": 0})  # p: drop rate
      >>> round(float((out == 0).mean()), 2), float(out.max())
      (0.25, 1.3333333730697632)
      >>> bool(np.array_equal(dropout_forward(x, {"p": 0.25, "mode": "test"})[0], x))  # test mode
      True
    """
    p, mode = dropout_param["p"], dropout_param["mode"]
    if mode not in ("train", "test"):
        raise ValueError(f"dropout_param['mode'] must be 'train' or 'test'; got {mode!r}.")
    x = _jnp(x)
    if mode == "test":
        return _np(x), (dropout_param, None)
    key = _dropout_key(dropout_param)
    rate = drop_rate(p)
    out, pullback = jax.vjp(lambda x: dropout(key, x, rate=rate, train=True), x)
    return _np(out), (dropout_param, pullback)


def dropout_backward(dout, cache):
    """``dout * mask / (1 - rate)`` in train mode, ``rate`` the drop probability (the core's
    rule), ``dout`` in test mode.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layers import dropout_backward, dropout_forward
      >>> x = np.ones((4, 5), np.float32)
      >>> out, cache = dropout_forward(x, {"p": 0.5, "mode": "train", "seed": 1})
      >>> dx = dropout_backward(np.ones_like(x), cache)
      >>> bool(np.array_equal(dx, out))  # the same mask, the same scale
      True
    """
    dropout_param, pullback = cache
    if dropout_param["mode"] == "test" or pullback is None:
        return _np(_jnp(dout))
    return _np(pullback(_jnp(dout))[0])
