"""``cs231n/classifiers/fc_net.py``: the assignment's ``FullyConnectedNet``, on :mod:`jaxbn.nets`.

Every generation of its signature works: ``dropout`` as the 2016-17 drop probability (or, after
``jaxbn.cs231n.set_dropout_p("keep")``, as the 2018-20 keep probability), ``use_batchnorm``
(2016-17) or ``normalization`` (2018+), and ``dropout_keep_ratio`` (2021+). Without that line the
2018-20 spelling ``dropout=1`` ("keep everything") is refused with an explanation, because read
as a drop probability it would drop every unit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks, _losses, nets
from jaxbn._batch_norm import BatchNormState
from jaxbn._normalize import BACKWARDS
from jaxbn.cs231n import _dropout_p
from jaxbn.cs231n.layers import _dropout_key, _jnp, _np

__all__ = ["FullyConnectedNet"]


@functools.partial(jax.jit, static_argnames=("train",))
def _loss_and_grads(params, state, x, y, key, reg, *, train):
    def objective(params):
        scores, new_state = nets.apply_mlp(params, state, x, train=train, key=key)
        return _losses.softmax_cross_entropy(scores, y) + _losses.l2_penalty(params, reg), \
            new_state

    return jax.value_and_grad(objective, has_aux=True)(params)


def _drop_rate(dropout, dropout_keep_ratio, meaning) -> float:
    """The drop probability from either spelling, with ``dropout`` read as ``meaning`` says
    (``"drop"`` or ``"keep"``), refusing the ambiguous ones."""
    if dropout is not None and dropout_keep_ratio is not None:
        raise ValueError(f"pass dropout (a {meaning} probability here) or dropout_keep_ratio (a "
                         f"keep probability), not both; got dropout={dropout!r}, "
                         f"dropout_keep_ratio={dropout_keep_ratio!r}.")
    if dropout_keep_ratio is not None:
        keep = _checks.check_real("dropout_keep_ratio", dropout_keep_ratio, low=0.0, high=1.0,
                                  low_open=True)
        return 1.0 - keep
    if meaning == "keep":
        keep = _checks.check_real("dropout", 1.0 if dropout is None else dropout, low=0.0,
                                  high=1.0)
        if keep == 0.0:
            raise ValueError(
                "dropout=0 would drop every unit: after set_dropout_p('keep'), as in the 2018-20 "
                "assignment, dropout is the probability of keeping a unit (1 = no dropout).")
        return 1.0 - keep
    rate = _checks.check_real("dropout", 0.0 if dropout is None else dropout, low=0.0, high=1.0)
    if rate == 1.0:
        raise ValueError(
            "dropout=1 would drop every unit. Here, as in the 2016-17 assignment, dropout is the "
            "probability of dropping a unit (0 = no dropout); in the 2018-20 assignment it was "
            "the keep probability, with dropout=1 meaning 'no dropout'. For no dropout pass "
            "dropout=0 (or dropout_keep_ratio=1); to keep units with probability k pass "
            "dropout_keep_ratio=k, or put jaxbn.cs231n.set_dropout_p('keep') at the top of a "
            "2018+ notebook.")
    return rate


def _keep(dropout, dropout_keep_ratio) -> float:
    """The keep probability as given (not ``1 - (1 - k)``, which rounds)."""
    return float(dropout_keep_ratio if dropout_keep_ratio is not None else dropout)


def _normalization(use_batchnorm, normalization):
    if use_batchnorm:
        if normalization not in (None, "batchnorm"):
            raise ValueError(f"use_batchnorm=True conflicts with normalization={normalization!r}.")
        return "batchnorm"
    if normalization not in nets.NORMALIZATIONS:
        raise ValueError(f"normalization must be one of None, 'batchnorm', 'layernorm'; got "
                         f"{normalization!r}.")
    return normalization


class FullyConnectedNet:
    """cs231n's ``{affine - [batch/layer norm] - relu - [dropout]} x (L - 1) - affine - softmax``.

    Weights are ``weight_scale * np.random.randn(fan_in, fan_out)`` drawn from numpy's global RNG
    in layer order, as in the assignment, so a seeded construction gives its weights.
    ``loss(X)`` returns scores (test mode); ``loss(X, y)`` returns ``(loss, grads)`` with gradients
    by JAX through jaxbn's layers (one jitted computation).

    Args:
      hidden_dims, input_dim, num_classes, reg, weight_scale, dtype, seed: as in the assignment.
      dropout: probability of *dropping* a unit (2016-17), 0 or None for no dropout; after
        ``jaxbn.cs231n.set_dropout_p("keep")`` the probability of *keeping* one (2018-20), 1 or
        None for no dropout.
      use_batchnorm: the 2016-17 spelling of ``normalization="batchnorm"``.
      normalization: None, ``"batchnorm"`` or ``"layernorm"`` (2018+).
      dropout_keep_ratio: probability of *keeping* a unit (2021+); 1 for no dropout.
      backward: jaxbn's option, the normalizations' backward rule in ``loss``: ``"alt"``
        (default, the closed-form derivation), ``"graph"`` (the staged one) or ``"autodiff"``.

    ``dropout_param["p"]`` holds the drop probability, or the keep probability after
    ``set_dropout_p("keep")``, as each era's notebook reads it.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.classifiers.fc_net import FullyConnectedNet
      >>> np.random.seed(231)
      >>> model = FullyConnectedNet([20, 30], input_dim=15, num_classes=10,
      ...                           normalization="batchnorm", dropout_keep_ratio=0.9)
      >>> x, y = np.random.randn(2, 15).astype(np.float32), np.array([0, 5])
      >>> loss, grads = model.loss(x, y)
      >>> sorted(grads) == sorted(model.params), model.loss(x).shape
      (True, (2, 10))
    """

    def __init__(self, hidden_dims, input_dim=3 * 32 * 32, num_classes=10, dropout=None,
                 use_batchnorm=False, normalization=None, reg=0.0, weight_scale=1e-2,
                 dtype=np.float32, seed=None, dropout_keep_ratio=None, *, backward="alt"):
        self._p_means = _dropout_p.dropout_p()  # how dropout_param["p"] reads, fixed here
        rate = _drop_rate(dropout, dropout_keep_ratio, self._p_means)
        _checks.check_choice("backward", backward, BACKWARDS)
        self.backward = backward
        self.normalization = _normalization(use_batchnorm, normalization)
        self.use_batchnorm = self.normalization == "batchnorm"
        self.use_dropout = rate > 0
        self.reg = reg
        self.num_layers = 1 + len(hidden_dims)
        self.dtype = dtype
        self.params = {}
        dims = [input_dim, *hidden_dims, num_classes]
        for i in range(1, self.num_layers + 1):
            self.params[f"W{i}"] = weight_scale * np.random.randn(dims[i - 1], dims[i])
            self.params[f"b{i}"] = np.zeros(dims[i])
            if self.normalization is not None and i < self.num_layers:
                self.params[f"gamma{i}"] = np.ones(dims[i])
                self.params[f"beta{i}"] = np.zeros(dims[i])
        self.params = {name: value.astype(dtype) for name, value in self.params.items()}
        self.dropout_param = {}
        if self.use_dropout:
            p = rate if self._p_means == "drop" else _keep(dropout, dropout_keep_ratio)
            self.dropout_param = {"mode": "train", "p": p}
            if seed is not None:
                self.dropout_param["seed"] = seed
        self.bn_params = []
        if self.normalization is not None:
            self.bn_params = [{"mode": "train"} for _ in range(self.num_layers - 1)]

    def _net_state(self) -> nets.NetState:
        stat_dtype = _checks.stat_dtype(self.dtype)
        bn_states: tuple[BatchNormState, ...] = ()
        if self.use_batchnorm:
            zeros = lambda i: np.zeros(self.params[f"b{i}"].shape)
            bn_states = tuple(BatchNormState(
                jnp.asarray(p.get("running_mean", zeros(i)), stat_dtype),
                jnp.asarray(p.get("running_var", zeros(i)), stat_dtype))
                for i, p in enumerate(self.bn_params, start=1))
        first = self.bn_params[0] if self.bn_params else {}
        rate = (_dropout_p.drop_rate(float(self.dropout_param["p"]), self._p_means)
                if self.use_dropout else 0.0)
        return nets.NetState(bn_states, self.normalization, rate,
                             float(first.get("momentum", 0.9)), float(first.get("eps", 1e-5)),
                             backward=self.backward)

    def loss(self, X, y=None):
        """Scores ``(N, C)`` for ``y=None`` (test mode); else ``(loss, grads)`` (train mode)."""
        mode = "test" if y is None else "train"
        if self.use_dropout:
            self.dropout_param["mode"] = mode
        for bn_param in self.bn_params:
            bn_param["mode"] = mode
        state = self._net_state()
        params = {k: _jnp(v) for k, v in self.params.items()}
        X = jnp.asarray(_jnp(X), self.dtype)
        if y is None:
            return _np(nets.apply_mlp(params, state, X, train=False)[0])
        key = _dropout_key(self.dropout_param) if self.use_dropout else None
        (loss, new_state), grads = _loss_and_grads(params, state, X, jnp.asarray(y), key,
                                                   self.reg, train=True)
        for bn_param, bn in zip(self.bn_params, new_state.batch_norm):
            bn_param["running_mean"], bn_param["running_var"] = _np(bn.mean, bn.var)
        return float(loss), {k: _np(v) for k, v in grads.items()}
