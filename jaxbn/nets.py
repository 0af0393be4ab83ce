"""Networks built from jaxbn's layers, as pure functions on pytrees.

- :func:`init_mlp` / :func:`apply_mlp`: ``{affine - [batch norm | layer norm] - relu - [dropout]}
  x (L - 1) - affine``, cs231n's ``FullyConnectedNet``;
- :func:`init_conv_net` / :func:`apply_conv_net`: ``{conv - [spatial batch norm] - relu - 2x2 max
  pool} x len(conv_channels)``, then the MLP as the head, for NCHW images;
- :func:`softmax_cross_entropy` and :func:`l2_penalty`, the loss.

Parameters are a dict of arrays (cs231n's names: ``W1``, ``b1``, ``gamma1``, ``beta1``, ...; the
conv net's are ``conv1_W``, ``conv1_b``, ``conv1_gamma``, ``conv1_beta``, ... plus the head's); the
state is a :class:`NetState` whose leaves are the running statistics and whose static metadata holds
the architecture's options, so ``apply`` needs no configuration argument and works under ``jit``,
``vmap`` and ``grad``. ``dataclasses.replace(state, axis_name="data")`` makes every batch norm
synchronized across the mapped axis ``"data"`` (data-parallel training under ``shard_map``).

Shapes: ``N`` batch, ``D`` input features, ``C, H, W`` image channels/height/width, ``K`` classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _checks
from jaxbn._batch_norm import BatchNormState, batch_norm, init_batch_norm_state, spatial_batch_norm
from jaxbn._dropout import dropout
from jaxbn._layer_norm import group_norm, layer_norm
from jaxbn._losses import l2_penalty, softmax_cross_entropy
from jaxbn._normalize import BACKWARDS

__all__ = ["NetState", "init_mlp", "apply_mlp", "init_conv_net", "apply_conv_net",
           "softmax_cross_entropy", "l2_penalty", "NORMALIZATIONS"]

NORMALIZATIONS = (None, "batchnorm", "layernorm")


@dataclasses.dataclass(frozen=True)
class NetState:
    """Running statistics of a network plus its static options (a pytree).

    Only ``batch_norm`` holds arrays; the other fields are static metadata (part of the tree
    structure), so ``jit`` specializes on them and ``vmap`` leaves them alone.

    Example:
      >>> import dataclasses, jax
      >>> from jaxbn import nets
      >>> _, state = nets.init_mlp(jax.random.key(0), 4, [8, 8], 3, normalization="batchnorm")
      >>> len(state.batch_norm), len(jax.tree.leaves(state))  # two layers, mean/var/count each
      (2, 6)
      >>> synced = dataclasses.replace(state, axis_name="data")  # synchronized batch norm
    """

    batch_norm: tuple[BatchNormState, ...]  # one per batch-normalized layer, in layer order
    normalization: str | None = None  # None, "batchnorm" or "layernorm"
    dropout_rate: float = 0.0  # drop probability after each hidden relu (0: no dropout)
    momentum: float = 0.9  # batch norm's running-average momentum
    eps: float = 1e-5
    axis_name: Any = None  # mapped axis name(s) batch norm synchronizes over (data parallelism)
    backward: str = "alt"  # the normalizations' backward rule: "alt", "graph" or "autodiff"


jax.tree_util.register_dataclass(
    NetState, data_fields=["batch_norm"],
    meta_fields=["normalization", "dropout_rate", "momentum", "eps", "axis_name", "backward"])


def _check_dims(name: str, dims: Any) -> tuple[int, ...]:
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of positive ints; got {dims!r}.") from None
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"{name} must be a sequence of positive ints; got {dims!r}.")
    return dims


def _check_options(normalization, dropout_rate, weight_scale, backward):
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of None, 'batchnorm', 'layernorm'; "
                         f"got {normalization!r}.")
    _checks.check_choice("backward", backward, BACKWARDS)
    rate = _checks.check_real("dropout_rate", dropout_rate, low=0.0, high=1.0)
    if rate == 1.0:
        raise ValueError("dropout_rate must be < 1 (1 drops every unit); got 1.0.")
    if weight_scale is not None:
        _checks.check_real("weight_scale", weight_scale, low=0.0, low_open=True)
    return rate


def _weight(key, shape, fan_in, weight_scale, dtype):
    # weight_scale=None: He initialization, sqrt(2 / fan_in), suited to relu.
    scale = jnp.sqrt(2.0 / fan_in) if weight_scale is None else weight_scale
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def init_mlp(key: jax.Array, input_dim: int, hidden_dims: Sequence[int], num_classes: int, *,
             normalization: str | None = None, dropout_rate: float = 0.0,
             weight_scale: float | None = 1e-2, dtype: Any = jnp.float32,
             backward: str = "alt") -> tuple[dict[str, jax.Array], NetState]:
    """Initializes the MLP: weights ``weight_scale * N(0, 1)``, biases and betas 0, gammas 1.

    Args:
      key: PRNG key for the weights.
      input_dim: ``D``; inputs of other shapes are flattened to ``(N, D)``.
      hidden_dims: sizes of the ``L - 1`` hidden layers.
      num_classes: ``K``.
      normalization: None, ``"batchnorm"`` or ``"layernorm"`` after each hidden affine.
      dropout_rate: drop probability after each hidden relu; 0 disables dropout.
      weight_scale: standard deviation of the weights; None for He initialization.
      dtype: parameter dtype (running statistics stay float32 or wider).
      backward: the normalizations' backward rule, ``"alt"`` (default), ``"graph"`` or
        ``"autodiff"`` (see :func:`jaxbn.batch_norm`); kept in the state, so ``apply_mlp`` and
        :func:`jaxbn.training.fit` use it.

    Returns:
      ``(params, state)``: params ``W1..WL, b1..bL`` (and ``gamma1.., beta1..`` with
      normalization), and a :class:`NetState`.

    Example:
      >>> import jax
      >>> from jaxbn import nets
      >>> params, state = nets.init_mlp(jax.random.key(0), 64, [100, 50], 10,
      ...                               normalization="batchnorm", dropout_rate=0.1)
      >>> sorted(params)
      ['W1', 'W2', 'W3', 'b1', 'b2', 'b3', 'beta1', 'beta2', 'gamma1', 'gamma2']
      >>> state.normalization, state.dropout_rate, state.backward
      ('batchnorm', 0.1, 'alt')
    """
    input_dim = _checks.check_positive_int("input_dim", input_dim)
    num_classes = _checks.check_positive_int("num_classes", num_classes)
    hidden_dims = _check_dims("hidden_dims", hidden_dims)
    rate = _check_options(normalization, dropout_rate, weight_scale, backward)
    dims = (input_dim, *hidden_dims, num_classes)
    keys = jax.random.split(key, len(dims) - 1)
    params, states = {}, []
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:]), start=1):
        params[f"W{i}"] = _weight(keys[i - 1], (fan_in, fan_out), fan_in, weight_scale, dtype)
        params[f"b{i}"] = jnp.zeros((fan_out,), dtype)
        if normalization is not None and i < len(dims) - 1:
            params[f"gamma{i}"] = jnp.ones((fan_out,), dtype)
            params[f"beta{i}"] = jnp.zeros((fan_out,), dtype)
            if normalization == "batchnorm":
                states.append(init_batch_norm_state(fan_out, _checks.stat_dtype(dtype)))
    return params, NetState(tuple(states), normalization, rate, backward=backward)


def _num_layers(params: dict[str, Any], name: str) -> int:
    """How many consecutive layers ``name.format(1)``, ``name.format(2)``, ... ``params`` holds."""
    count = 0
    while name.format(count + 1) in params:
        count += 1
    if count == 0:
        raise ValueError(f"params must hold {name.format(1)}, {name.format(2)}, ...; got keys "
                         f"{sorted(params)}.")
    return count


def _normalize_hidden(h, gamma, beta, state, bn_state, *, train, spatial):
    """A hidden layer's normalization as ``state.normalization`` says, then its ReLU: batch norm
    with the running statistics ``bn_state`` (spatial for conv features) and the ReLU fused into
    its rule, layer norm (group norm with one group for conv features), or none. Returns
    ``(h, new_bn_state)``; ``new_bn_state`` is None unless the layer is batch-normalized. Pure:
    nothing it is given is changed."""
    if state.normalization == "batchnorm":
        norm = spatial_batch_norm if spatial else batch_norm
        return norm(h, gamma, beta, bn_state, train=train, momentum=state.momentum,
                    eps=state.eps, axis_name=state.axis_name if train else None,
                    backward=state.backward, activation="relu")
    if state.normalization == "layernorm":
        h = (group_norm(h, gamma, beta, groups=1, eps=state.eps, backward=state.backward)
             if spatial else layer_norm(h, gamma, beta, eps=state.eps, backward=state.backward))
    return jax.nn.relu(h), None


def _hidden_layer(h, gamma, beta, state, bn_states, *, train, spatial):
    """Normalizes one hidden layer and applies its ReLU; returns ``(h, bn_states)`` with the
    layer's new running statistics appended to the tuple it was given (a new tuple)."""
    bn_state = state.batch_norm[len(bn_states)] if state.normalization == "batchnorm" else None
    h, new = _normalize_hidden(h, gamma, beta, state, bn_state, train=train, spatial=spatial)
    return h, bn_states if new is None else bn_states + (new,)


def _layer_key(key, index):
    return None if key is None else jax.random.fold_in(key, index)


def apply_mlp(params: dict[str, jax.Array], state: NetState, x: jax.Array, *, train: bool,
              key: jax.Array | None = None) -> tuple[jax.Array, NetState]:
    """Scores of the MLP: ``(N, ...) -> (N, K)``, and the new state.

    Args:
      params, state: from :func:`init_mlp`.
      x: inputs, flattened to ``(N, D)``.
      train: Python bool; batch statistics and dropout (True) or running statistics (False).
      key: PRNG key for dropout, required in train mode when ``dropout_rate > 0``.

    Returns:
      ``(scores, new_state)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbn import nets
      >>> params, state = nets.init_mlp(jax.random.key(0), 8, [16], 3, normalization="batchnorm",
      ...                               dropout_rate=0.5)
      >>> x = jax.random.normal(jax.random.key(1), (32, 8))
      >>> scores, state = nets.apply_mlp(params, state, x, train=True, key=jax.random.key(2))
      >>> scores.shape, int(state.batch_norm[0].count)
      ((32, 3), 1)
      >>> test_scores, _ = nets.apply_mlp(params, state, x, train=False)  # no key needed
    """
    _checks.check_train(train)
    num_layers = _num_layers(params, "W{}")
    x = _checks.check_float_array("x", x)
    x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
    if x.shape[1] != params["W1"].shape[0]:
        raise ValueError(f"x must have {params['W1'].shape[0]} features per example (W1's "
                         f"input dimension); got shape {tuple(x.shape)}.")
    h, new_states = x, ()
    for i in range(1, num_layers):
        h = h @ params[f"W{i}"] + params[f"b{i}"]
        h, new_states = _hidden_layer(h, params.get(f"gamma{i}"), params.get(f"beta{i}"), state,
                                      new_states, train=train, spatial=False)
        if state.dropout_rate > 0.0:
            h = dropout(_layer_key(key, i), h, rate=state.dropout_rate, train=train)
    scores = h @ params[f"W{num_layers}"] + params[f"b{num_layers}"]
    return scores, dataclasses.replace(state, batch_norm=new_states)


def init_conv_net(key: jax.Array, input_shape: Sequence[int] = (1, 8, 8),
                  conv_channels: Sequence[int] = (16, 32), hidden_dims: Sequence[int] = (100,),
                  num_classes: int = 10, *, normalization: str | None = None,
                  dropout_rate: float = 0.0, kernel_size: int = 3,
                  weight_scale: float | None = None, dtype: Any = jnp.float32,
                  backward: str = "alt") -> tuple[dict[str, jax.Array], NetState]:
    """Initializes the conv net: conv layers ``conv{i}_W`` ``(C_out, C_in, k, k)``, then the MLP.

    Each conv layer halves H and W (2x2 max pool, floor). ``normalization="batchnorm"`` puts
    spatial batch norm after each conv and batch norm in the head; ``"layernorm"`` puts group norm
    with one group (layer norm over C, H, W) after each conv and layer norm in the head.
    ``weight_scale=None`` (default) is He initialization. ``backward`` as in :func:`init_mlp`.

    Returns:
      ``(params, state)``.

    Example:
      >>> import jax
      >>> from jaxbn import nets
      >>> params, state = nets.init_conv_net(jax.random.key(0), (1, 8, 8), (16, 32), (100,), 10,
      ...                                    normalization="batchnorm")
      >>> params["conv1_W"].shape, params["W1"].shape  # two 2x2 pools: 8x8 -> 2x2
      ((16, 1, 3, 3), (128, 100))
      >>> len(state.batch_norm)  # two spatial batch norms and one in the head
      3
    """
    input_shape = _check_dims("input_shape", input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W); got {input_shape!r}.")
    conv_channels = _check_dims("conv_channels", conv_channels)
    kernel_size = _checks.check_positive_int("kernel_size", kernel_size)
    _check_options(normalization, dropout_rate, weight_scale, backward)
    channels, height, width = input_shape
    keys = jax.random.split(key, len(conv_channels) + 1)
    params, states = {}, []
    for i, out_channels in enumerate(conv_channels, start=1):
        fan_in = channels * kernel_size ** 2
        params[f"conv{i}_W"] = _weight(keys[i - 1], (out_channels, channels, kernel_size,
                                                     kernel_size), fan_in, weight_scale, dtype)
        params[f"conv{i}_b"] = jnp.zeros((out_channels,), dtype)
        if normalization is not None:
            params[f"conv{i}_gamma"] = jnp.ones((out_channels,), dtype)
            params[f"conv{i}_beta"] = jnp.zeros((out_channels,), dtype)
            if normalization == "batchnorm":
                states.append(init_batch_norm_state(out_channels, _checks.stat_dtype(dtype)))
        channels, height, width = out_channels, height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"input_shape {input_shape!r} is too small for "
                             f"{len(conv_channels)} conv layers with 2x2 pooling.")
    head, head_state = init_mlp(keys[-1], channels * height * width, hidden_dims, num_classes,
                                normalization=normalization, dropout_rate=dropout_rate,
                                weight_scale=weight_scale, dtype=dtype, backward=backward)
    params.update(head)
    return params, dataclasses.replace(head_state, batch_norm=tuple(states) + head_state.batch_norm)


def apply_conv_net(params: dict[str, jax.Array], state: NetState, x: jax.Array, *, train: bool,
                   key: jax.Array | None = None) -> tuple[jax.Array, NetState]:
    """Scores of the conv net for NCHW images ``(N, C, H, W) -> (N, K)``, and the new state.

    Arguments and results as :func:`apply_mlp`'s, with ``x`` of shape ``(N, C, H, W)``.

    Example:
      >>> import jax
      >>> from jaxbn import nets
      >>> params, state = nets.init_conv_net(jax.random.key(0), (1, 8, 8), (4,), (16,), 10,
      ...                                    normalization="batchnorm")
      >>> images = jax.random.normal(jax.random.key(1), (5, 1, 8, 8))
      >>> scores, state = nets.apply_conv_net(params, state, images, train=True)
      >>> scores.shape
      (5, 10)
    """
    _checks.check_train(train)
    x = _checks.check_float_array("x", x)
    _checks.check_ndim("x", x, ndim=4, what="NCHW images")
    num_conv = _num_layers(params, "conv{}_W")
    if x.shape[1] != params["conv1_W"].shape[1]:
        raise ValueError(f"x must have {params['conv1_W'].shape[1]} channels (NCHW); got shape "
                         f"{tuple(x.shape)}.")
    h, new_states = x, ()
    for i in range(1, num_conv + 1):
        h = jax.lax.conv_general_dilated(h, params[f"conv{i}_W"].astype(h.dtype), (1, 1), "SAME",
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        h = h + params[f"conv{i}_b"].reshape(1, -1, 1, 1)
        h, new_states = _hidden_layer(h, params.get(f"conv{i}_gamma"), params.get(f"conv{i}_beta"),
                                      state, new_states, train=train, spatial=True)
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    head = {k: v for k, v in params.items() if not k.startswith("conv")}
    head_state = dataclasses.replace(state, batch_norm=state.batch_norm[len(new_states):])
    scores, head_state = apply_mlp(head, head_state, h, train=train, key=key)
    return scores, dataclasses.replace(head_state, batch_norm=new_states + head_state.batch_norm)
