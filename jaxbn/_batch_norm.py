"""Batch normalization with running statistics: ``batch_norm`` and ``spatial_batch_norm``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxbn import _checks, _layout, _parallel, _renorm
from jaxbn._layout import Layout, check_image_layout, layout
from jaxbn._normalize import BACKWARDS, configure, normalize, normalize_with
from jaxbn._rules import ACTIVATIONS, AxisGroups, Config, epilogue, psum


class BatchNormState(NamedTuple):
    """Running statistics of a batch norm layer (a pytree).

    Updated in train mode as ``new = momentum * old + (1 - momentum) * batch_statistic``, or with
    ``momentum=None`` as the cumulative average of every batch seen (which needs ``count``).
    ``BatchNormState(mean, var)`` (no counter) still works for every other option.

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> state = jaxbn.BatchNormState(jnp.zeros(3), jnp.ones(3))  # without a counter
      >>> state.count is None, state.mean.shape
      (True, (3,))
    """

    mean: jax.Array  # (D,) running mean
    var: jax.Array  # (D,) running variance (biased unless running_var="unbiased")
    # () int32: train-mode batches seen (PyTorch's num_batches_tracked); the name shadows
    # tuple.count on purpose.
    count: jax.Array | None = None  # type: ignore[assignment]


def init_batch_norm_state(num_features: int, dtype: Any = jnp.float32) -> BatchNormState:
    """Returns the initial running statistics: mean zeros, variance ones, both ``(num_features,)``,
    and a batch counter at 0.

    ``dtype`` complex (for complex ``x``): the mean is complex, the variance real (the variance
    of complex values, ``mean(|x - mean|^2)``, is real).

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> state = jaxbn.init_batch_norm_state(3)
      >>> state.mean.tolist(), state.var.tolist(), int(state.count), state.mean.dtype.name
      ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 0, 'float32')
      >>> complex_state = jaxbn.init_batch_norm_state(3, jnp.complex64)
      >>> complex_state.mean.dtype.name, complex_state.var.dtype.name
      ('complex64', 'float32')
    """
    num_features = _checks.check_positive_int("num_features", num_features)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"dtype must be a floating or complex dtype; got {jnp.dtype(dtype)}.")
    return BatchNormState(jnp.zeros((num_features,), dtype),
                          jnp.ones((num_features,), _checks.real_dtype(dtype)),
                          jnp.zeros((), jnp.int32))


def batch_norm(x: jax.Array, gamma: jax.Array | None, beta: jax.Array | None,
               state: BatchNormState, *, train: bool, momentum: float | None = 0.9,
               eps: float = 1e-5, axis: int = -1, backward: str = "alt", axis_name: Any = None,
               mask: jax.Array | None = None, running_var: str = "biased",
               virtual_batch_size: int | None = None, renorm: dict | None = None,
               axis_index_groups: Any = None, allow_one_value: bool = False,
               activation: str | None = None,
               residual: jax.Array | None = None) -> tuple[jax.Array, BatchNormState]:
    r"""Batch normalization over every axis of ``x`` but the feature axis.

    ``momentum`` weights the *old* running value: ``new = momentum * old + (1 - momentum) *
    batch``, default 0.9 (the paper's and cs231n's convention). PyTorch's momentum=0.1 is
    momentum=0.9 here; ``jaxbn.torch_compat.momentum_from_torch`` converts.

    .. math::

        \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
        y = \mathrm{act}(\gamma \hat x + \beta + r)

    with the optional fused epilogue: ``r`` the ``residual`` (0 without one) and ``act`` the
    ``activation`` (the identity without one), the ``bn -> add -> relu`` of residual nets in one
    ``custom_vjp`` whose backward masks the cotangent by ``y > 0`` (no extra array kept).

    In train mode ``mu`` and ``sigma^2`` are the batch mean and the biased batch variance over all
    axes but ``axis`` (across the mapped axes ``axis_name`` too, and over the entries ``mask``
    marks valid), and the running statistics become
    ``momentum * running + (1 - momentum) * batch``. In test mode the running statistics normalize
    and the state is returned unchanged. The state never carries a gradient.

    Shapes: ``N`` batch, ``D`` features (``x.shape[axis]``); ``x`` is ``(N, D)`` or any rank >= 2.

    Args:
      x: input of rank >= 2, floating or complex. bfloat16/float16 inputs give outputs and
        gradients in their dtype; the statistics are computed in float32. Complex ``x`` (as
        Flax's complex batch norm): a complex mean, the real variance ``mean(|x - mean|^2)``,
        ``gamma``/``beta`` real or complex, a complex ``state.mean``
        (``init_batch_norm_state(D, jnp.complex64)``) and a real ``state.var``.
      gamma: scale, ``(D,)``; None for no scale (PyTorch ``affine=False``, Flax ``use_scale``).
      beta: shift, ``(D,)``; None for no shift.
      state: running statistics, a :class:`BatchNormState` of two ``(D,)`` arrays and a counter.
      train: Python bool: batch statistics (True) or running statistics (False).
      momentum: weight of the *old* running value, in [0, 1] (PyTorch's momentum is 1 minus this);
        None for the cumulative average of every batch seen (PyTorch's ``momentum=None``; needs
        the state's ``count``).
      eps: added to the variance, > 0.
      axis: the feature axis.
      backward: ``"alt"`` (default) the simplified closed-form backward, ``"graph"`` the staged
        backward through the computational graph, both hand-written ``custom_vjp`` rules;
        ``"autodiff"`` the naive forward differentiated by JAX, the only one that supports
        forward-mode ``jax.jvp`` (the custom rules are reverse-mode; second-order reverse works).
      axis_name: name (or tuple of names) of mapped axes (``jax.vmap(..., axis_name=...)``,
        ``jax.shard_map``, ``jax.pmap``) whose slices form one global batch (synchronized batch
        norm): the statistics, and the backward's per-feature sums, are reduced across them with
        ``lax.psum``. The "fewer than 2 values" check counts the global batch.
        ``jaxbn.LOCAL``: each device's own statistics on purpose (``None`` computes the same but
        warns once under ``jax.shard_map`` when ``x`` varies over mesh axes; see
        :mod:`jaxbn._parallel`).
      mask: boolean array of ``x``'s shape without the feature axis (one flag per position), or
        of ``x``'s own shape (one flag per entry: each feature's statistics over its own valid
        entries); size 1 broadcasts. Only the ``True`` entries enter the statistics and the
        running-statistics update, count-weighted across ``axis_name``. The mask selects:
        ``False`` entries are padding, whatever they hold (NaN, inf), and affect no valid output,
        statistic or gradient; their own output and gradient are 0. A feature with no valid
        entry keeps its running statistics and gives finite outputs (no NaN). With ``mask`` or
        ``axis_name``, ``backward`` is ``"alt"`` or ``"autodiff"`` (``"graph"`` raises).
      running_var: ``"biased"`` (default, cs231n) or ``"unbiased"`` (PyTorch): the running
        variance accumulates ``var * m / (m - 1)`` over ``m`` values; normalization always uses
        the biased batch variance.
      virtual_batch_size: ghost batch norm: each consecutive group of this many examples (axis
        0) is normalized with its own statistics (a free reshape, no copy); the running
        statistics move by the mean of the groups' statistics. Must divide the batch.
      renorm: batch renormalization, ``dict(r_max=..., d_max=...)`` (values may be traced, to
        ramp them with the step): see :mod:`jaxbn._renorm`. ``r_max=1, d_max=0`` is batch norm.
      axis_index_groups: with ``axis_name``, device subgroups (lists of indices along it, of equal
        size) normalized separately, as Flax and Haiku do; supported where ``lax.psum`` supports
        it (``jax.pmap``; not ``jax.vmap``).
      allow_one_value: accept one value per feature in train mode (a batch of one): its variance
        is 0, so ``y = beta``, as Flax and Equinox compute it. By default that raises, as
        PyTorch does, because it is almost always a mistake (a per-example call without
        ``axis_name``).
      activation: None (default) or ``"relu"``: applied after the affine and the residual, in
        the same rule (``jax.nn.relu``'s derivative: 0 at 0). Not for complex ``x``.
      residual: None or an array of ``x``'s shape and dtype added before the activation; its
        gradient is ``dy * (y > 0)`` (``dy`` without an activation).

    Returns:
      ``(y, new_state)``: ``y`` of ``x``'s shape and dtype, and the updated running statistics.

    Raises:
      TypeError: non-floating ``x``/parameters, non-bool ``train``, non-numeric options.
      ValueError: wrong parameter or state shapes, ``axis`` out of range, rank < 2, fewer than two
        values per feature in train mode (unless ``allow_one_value``), unknown ``backward``,
        ``momentum`` outside [0, 1], ``eps <= 0``, a mask of the wrong shape, an unknown
        ``activation``, a ``residual`` whose shape is not ``x``'s.
      UnboundAxisNameError: an ``axis_name`` no enclosing transformation binds (a ``NameError``,
        as JAX raises, and a ``ValueError``).
      TypeError: also for a non-boolean ``mask``, a complex parameter or state mean with real
        ``x``, a real state mean with complex ``x``, a ``residual`` whose dtype is not ``x``'s,
        an ``activation`` with complex ``x``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> x = 3.0 * jax.random.normal(jax.random.key(0), (32, 4)) + 1.0
      >>> gamma, beta, state = jnp.ones(4), jnp.zeros(4), jaxbn.init_batch_norm_state(4)
      >>> y, state = jaxbn.batch_norm(x, gamma, beta, state, train=True)
      >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), bool(jnp.allclose(y.std(0), 1, atol=1e-3))
      (True, True)
      >>> bool(jnp.allclose(state.mean, 0.1 * x.mean(0)))  # 0.9 * 0 + 0.1 * batch mean
      True
      >>> y_test, same = jaxbn.batch_norm(x, gamma, beta, state, train=False)  # running stats
      >>> bool(jnp.all(same.mean == state.mean)) and int(same.count) == int(state.count) == 1
      True

      A mask per entry: each feature's statistics over its own valid entries.

      >>> valid = jax.random.bernoulli(jax.random.key(1), 0.7, (32, 4))
      >>> y, _ = jaxbn.batch_norm(x, gamma, beta, state, train=True, mask=valid)
      >>> bool(jnp.allclose(jnp.mean(y, 0, where=valid), 0, atol=1e-5))
      True
      >>> bool(jnp.allclose(jnp.std(y, 0, where=valid), 1, atol=1e-3))
      True

      The fused epilogue: ``relu(batch_norm(x) + skip)`` in one rule.

      >>> skip = jnp.ones((32, 4))
      >>> y, _ = jaxbn.batch_norm(x, gamma, beta, state, train=True, residual=skip,
      ...                         activation="relu")
      >>> y_ref = jax.nn.relu(jaxbn.batch_norm(x, gamma, beta, state, train=True)[0] + skip)
      >>> bool(jnp.allclose(y, y_ref, atol=1e-6)) and bool(jnp.all(y >= 0))
      True
    """
    x = _checks.check_float_array("x", x, complex_ok=True)
    _checks.check_ndim("x", x, min_ndim=2, what="a batch axis and a feature axis")
    axis = _checks.check_axis("axis", axis, x.ndim)
    vbs = _layout.check_virtual_batch_size(virtual_batch_size, x.shape, axis)
    lay = layout(x.shape, "batch", axis=axis, virtual_batch_size=vbs)
    return _batch_norm(x, gamma, beta, state, lay, train=train, momentum=momentum, eps=eps,
                       backward=backward, axis_name=axis_name, mask=mask,
                       running_var=running_var, renorm=renorm,
                       axis_index_groups=axis_index_groups, allow_one_value=allow_one_value,
                       activation=activation, residual=residual)


def spatial_batch_norm(x: jax.Array, gamma: jax.Array | None, beta: jax.Array | None,
                       state: BatchNormState, *, train: bool, momentum: float | None = 0.9,
                       eps: float = 1e-5, layout: str = "NCHW", backward: str = "alt",
                       axis_name: Any = None, mask: jax.Array | None = None,
                       running_var: str = "biased", virtual_batch_size: int | None = None,
                       renorm: dict | None = None, axis_index_groups: Any = None,
                       allow_one_value: bool = False, activation: str | None = None,
                       residual: jax.Array | None = None) -> tuple[jax.Array, BatchNormState]:
    """Batch normalization of image data per channel, over batch, height and width.

    The default layout is cs231n's and PyTorch's ``"NCHW"``; Flax and Equinox data is usually
    ``"NHWC"``: pass ``layout="NHWC"``. A wrong layout is caught by the parameter shapes (the
    error names the fix) unless C == H: then nothing can tell the two apart, so always pass
    ``layout`` explicitly for such data.

    The same computation as :func:`batch_norm` with the channel axis as the feature axis; the
    statistics reduce over N, H and W in place (no transpose or reshape of ``x``).

    Shapes: ``N`` batch, ``C`` channels, ``H, W`` height and width; ``x`` is ``(N, C, H, W)`` for
    ``layout="NCHW"`` or ``(N, H, W, C)`` for ``"NHWC"`` (``"NCW"``/``"NWC"`` and
    ``"NCDHW"``/``"NDHWC"`` for 1-D and 3-D data); ``gamma``, ``beta`` and the state's arrays are
    ``(C,)``.

    Args:
      x, gamma, beta, state, train, momentum, eps, backward, axis_name, running_var,
        virtual_batch_size, renorm, axis_index_groups, allow_one_value, activation, residual:
        as in :func:`batch_norm` (``residual`` of ``x``'s shape, in its layout).
      mask: boolean, ``(N, H, W)`` for NCHW and NHWC alike (one flag per position), or of
        ``x``'s shape (one per entry); size 1 broadcasts.
      layout: ``"NCHW"`` (default) or ``"NHWC"``, or a 1-D/3-D layout as above.

    Returns:
      ``(y, new_state)`` as in :func:`batch_norm`.

    Raises:
      As :func:`batch_norm`, and ValueError for an unknown ``layout`` or an ``x`` whose rank does
      not match it.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> x = jax.random.normal(jax.random.key(0), (8, 3, 4, 4))  # (N, C, H, W)
      >>> gamma, beta, state = jnp.ones(3), jnp.zeros(3), jaxbn.init_batch_norm_state(3)
      >>> y, new = jaxbn.spatial_batch_norm(x, gamma, beta, state, train=True)
      >>> y.shape, new.mean.shape
      ((8, 3, 4, 4), (3,))
      >>> y_nhwc, _ = jaxbn.spatial_batch_norm(x.transpose(0, 2, 3, 1), gamma, beta, state,
      ...                                      train=True, layout="NHWC")
      >>> bool(jnp.allclose(y_nhwc, y.transpose(0, 2, 3, 1), atol=1e-6))
      True
    """
    x = _checks.check_float_array("x", x, complex_ok=True)
    check_image_layout("layout", layout, x.shape)
    vbs = _layout.check_virtual_batch_size(virtual_batch_size, x.shape,
                                           _layout.channel_axis(layout, x.ndim))
    lay = _layout.layout(x.shape, "batch", image_layout=layout, virtual_batch_size=vbs)
    return _batch_norm(x, gamma, beta, state, lay, train=train, momentum=momentum, eps=eps,
                       backward=backward, axis_name=axis_name, mask=mask,
                       running_var=running_var, renorm=renorm,
                       axis_index_groups=axis_index_groups, allow_one_value=allow_one_value,
                       activation=activation, residual=residual)


def check_axis_name(axis_name: Any, axis_index_groups: Any = None) -> Any:
    """Rejects an ``axis_name`` that no enclosing ``vmap``/``shard_map``/``pmap`` binds; returns
    it, as :class:`AxisGroups` with ``axis_index_groups``."""
    if axis_index_groups is not None:
        if axis_name is None:
            raise ValueError("axis_index_groups needs axis_name: the groups split that mapped "
                             "axis into device subgroups.")
        try:
            groups = tuple(tuple(int(i) for i in group) for group in axis_index_groups)
        except TypeError:
            raise TypeError(f"axis_index_groups must be a list of lists of device indices; got "
                            f"{axis_index_groups!r}.") from None
        if not groups or len({len(g) for g in groups}) != 1 or not groups[0]:
            raise ValueError(f"axis_index_groups must be non-empty groups of equal size; got "
                             f"{axis_index_groups!r}.")
        axis_name = AxisGroups(axis_name, groups)
    if axis_name is None:
        return None
    try:
        psum(1, axis_name)
    except NameError:
        raise UnboundAxisNameError(
            f"axis_name {axis_name!r} is not bound here: call batch norm inside jax.vmap, "
            f"jax.shard_map or jax.pmap with that axis name, or pass axis_name=None."
        ) from None
    return axis_name


class UnboundAxisNameError(NameError, ValueError):
    """An ``axis_name`` no enclosing ``vmap``/``shard_map``/``pmap`` binds: a ``NameError``, as
    JAX raises for an unbound axis name, and a ``ValueError``, as for any bad argument."""


def check_mask(mask: Any, lay: Layout) -> jax.Array | None:
    """Returns the boolean mask shaped to broadcast against the layout's view of x: one flag per
    position (x's shape without the feature axis) or per entry (x's shape), size 1 broadcasting."""
    if mask is None:
        return None
    mask = _checks.check_bool_mask(mask)
    got = tuple(mask.shape)
    if len(got) == len(lay.shape) and all(m in (1, n) for m, n in zip(got, lay.shape)):
        return jnp.broadcast_to(mask, lay.shape).reshape(lay.view)  # one flag per entry
    full = lay.mask_view(got)
    if full is None:
        expected = tuple(n for a, n in enumerate(lay.shape) if a != lay.feature_axis)
        raise ValueError(f"mask must have x's shape without the feature axis, {expected} (one "
                         f"flag per position), or x's shape {lay.shape} (one per entry); size 1 "
                         f"broadcasts; got shape {got}.")
    return jnp.broadcast_to(mask.reshape(full), lay.position_shape).reshape(lay.position_view)


def check_epilogue(activation: Any, residual: Any, x: jax.Array) -> jax.Array | None:
    """The fused epilogue's arguments: ``activation`` None or a known name (not for complex
    ``x``), ``residual`` None or an array of exactly ``x``'s shape and dtype (no broadcast, no
    promotion). Returns the residual as an array."""
    if activation is not None:
        _checks.check_choice("activation", activation, ACTIVATIONS)
        if _checks.is_complex(x.dtype):
            raise TypeError(f"activation={activation!r} needs real x (a ReLU of complex values "
                            f"is undefined); got dtype {x.dtype}. Pass activation=None.")
    if residual is None:
        return None
    if not hasattr(residual, "shape") or not hasattr(residual, "dtype"):
        raise TypeError(f"residual must be an array of x's shape {tuple(x.shape)} and dtype "
                        f"{x.dtype}; got {type(residual).__name__}.")
    residual = jnp.asarray(residual)
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"residual must have x's shape {tuple(x.shape)} (shapes that would "
                         f"broadcast are refused); got shape {tuple(residual.shape)}.")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype}; got {residual.dtype}. Pass "
                        f"residual.astype(x.dtype).")
    return residual


def check_param(name: str, p: Any, lay: Layout, complex_ok: bool = False) -> jax.Array:
    """A per-feature array of exactly ``lay.param_shape`` (shapes that would broadcast are
    rejected too), floating (or complex, where ``complex_ok``); the error names the layout's
    fix."""
    p = _checks.check_float_array(name, p, complex_ok=complex_ok)
    if tuple(p.shape) != lay.param_shape:
        raise lay.param_error(name, p.shape)
    return p


def check_state(state: Any, lay: Layout, x_dtype: Any = jnp.float32) -> BatchNormState:
    """The running statistics checked against the layout; for complex x the mean is complex and
    the variance real."""
    if not isinstance(state, tuple) or len(state) not in (2, 3):
        raise TypeError(f"state must be a BatchNormState(mean, var[, count]); got "
                        f"{type(state).__name__}. Make one with "
                        f"jaxbn.init_batch_norm_state({lay.param_shape[0]}).")
    count = state[2] if len(state) == 3 else None
    if count is not None:
        count = jnp.asarray(count)
        if count.shape != () or not jnp.issubdtype(count.dtype, jnp.integer):
            raise ValueError(f"state.count must be an integer scalar (batches seen); got dtype "
                             f"{count.dtype} and shape {tuple(count.shape)}.")
    complex_x = _checks.is_complex(x_dtype)
    mean = check_param("state.mean", state[0], lay, complex_ok=complex_x)
    if complex_x and not _checks.is_complex(mean.dtype):
        raise TypeError(f"state.mean must be complex for complex x (the running mean of complex "
                        f"values is complex); got dtype {mean.dtype}. Make the state with "
                        f"jaxbn.init_batch_norm_state({lay.param_shape[0]}, jnp.{x_dtype}).")
    return BatchNormState(mean, check_param("state.var", state[1], lay), count)


RUNNING_VARS = ("biased", "unbiased")


class Prepared(NamedTuple):
    """A batch norm call after validation: the core's inputs in the layout's view."""

    x: jax.Array  # x.reshape(layout.view)
    gamma: jax.Array  # gamma.reshape(layout.param_view) (ones for gamma=None)
    beta: jax.Array  # (zeros for beta=None)
    state: BatchNormState  # without gradient
    mask: jax.Array | None  # broadcastable to x's view
    config: Config
    momentum: float | None  # None: cumulative average
    layout: Layout
    running_var: str = "biased"
    renorm: tuple[Any, Any] | None = None  # (r_max, d_max)
    residual: jax.Array | None = None  # added before the activation, in x's view


def _affine_params(gamma, beta, lay, x_dtype):
    """gamma/beta checked, or ones/zeros where None (no affine part), in one dtype (complex
    parameters only for complex x)."""
    complex_ok = _checks.is_complex(x_dtype)
    gamma = None if gamma is None else check_param("gamma", gamma, lay, complex_ok)
    beta = None if beta is None else check_param("beta", beta, lay, complex_ok)
    given = [a.dtype for a in (gamma, beta) if a is not None]
    dtype = _checks.common_dtype(*given) if given else _checks.stat_dtype(_checks.real_dtype(
        x_dtype))
    gamma = jnp.ones(lay.param_shape, dtype) if gamma is None else gamma.astype(dtype)
    beta = jnp.zeros(lay.param_shape, dtype) if beta is None else beta.astype(dtype)
    return gamma.reshape(lay.param_view), beta.reshape(lay.param_view)


def prepare(x, gamma, beta, state, lay: Layout, *, momentum, eps, backward, axis_name, mask,
            running_var="biased", renorm=None, axis_index_groups=None, activation=None,
            residual=None) -> Prepared:
    """Checks every argument of a batch norm call at trace time and views them for the core."""
    _checks.check_choice("backward", backward, BACKWARDS)
    _checks.check_choice("running_var", running_var, RUNNING_VARS)
    eps = _checks.check_real("eps", eps, low=0.0, low_open=True)
    x = _checks.check_float_array("x", x, complex_ok=True)
    residual = check_epilogue(activation, residual, x)
    gamma, beta = _affine_params(gamma, beta, lay, x.dtype)
    state = jax.tree.map(jax.lax.stop_gradient, check_state(state, lay, x.dtype))
    if momentum is None:
        if state.count is None:
            raise ValueError("momentum=None (the cumulative average of all batches, PyTorch's "
                             "meaning) needs a batch counter in the state: make it with "
                             "jaxbn.init_batch_norm_state(...) or pass BatchNormState(mean, var, "
                             "count=jnp.array(0)).")
    else:
        momentum = _checks.check_real("momentum", momentum, low=0.0, high=1.0)
    axis_name = check_axis_name(axis_name, axis_index_groups)
    mask = check_mask(mask, lay)
    if renorm is not None and _checks.is_complex(x.dtype):
        raise ValueError("renorm= is not available for complex x (batch renormalization clips "
                         "ratios of real standard deviations and real mean shifts).")
    renorm = _renorm.check_renorm(renorm, mask=mask, axis_name=axis_name, layout=lay)
    config = configure(lay, eps=eps, backward=backward, x_dtype=x.dtype, param_dtype=gamma.dtype,
                       axis_name=axis_name, masked=mask is not None, kernels=renorm is None,
                       x_type=jax.typeof(x), activation=activation,
                       residual=residual is not None)
    if residual is not None:
        residual = residual.reshape(lay.view)
    return Prepared(x.reshape(lay.view), gamma, beta, state, mask, config, momentum, lay,
                    running_var, renorm, residual)


def _check_batch_size(p: Prepared, allow_one_value: bool = False) -> None:
    count = p.layout.values_per_stat
    if p.config.axis_name is not None:
        count *= psum(1, p.config.axis_name)
    if count < 2 and p.mask is None and not allow_one_value:
        hint = ("" if p.config.axis_name is not None else
                " Calling batch norm per example under jax.vmap? Pass axis_name= (the vmap's "
                "axis_name) so that the vmapped axis becomes the batch.")
        raise ValueError(
            f"x must have at least 2 values per feature in train mode (the batch variance of one "
            f"value is 0); got shape {p.layout.shape}, {count} value per feature.{hint} To "
            f"normalize it anyway (y = beta, as Flax and Equinox do), pass allow_one_value=True.")


def _batch_norm(x, gamma, beta, state, lay, *, train, allow_one_value=False, **options):
    _checks.check_train(train)
    options["axis_name"] = _parallel.resolve_axis_name(x, options["axis_name"], train=train)
    p = prepare(x, gamma, beta, state, lay, **options)
    if not train:
        mean, var = (a.reshape(lay.param_view) for a in (p.state.mean, p.state.var))
        y = normalize_with(p.x, p.gamma, p.beta, mean, var, p.config.eps, p.residual,
                           p.config.activation)
        return y.reshape(lay.shape), p.state
    _check_batch_size(p, allow_one_value)
    if p.renorm is not None:
        running = (a.reshape(lay.param_view) for a in (p.state.mean, p.state.var))
        y, mean, var = _renorm.renormalize(p.x, p.gamma, p.beta, *running, *p.renorm, p.config)
        # Batch renormalization has its own rule; its epilogue is differentiated by JAX.
        y = epilogue(y, p.residual, p.config.activation)
    else:
        y, mean, var = normalize(p.x, p.gamma, p.beta, p.config, p.mask, p.residual)
    return y.reshape(lay.shape), new_state(p, mean, var)


def _values_per_statistic(p: Prepared, dtype: Any) -> jax.Array:
    """``m`` of each statistic, across devices (the valid entries' count with a mask), with the
    statistics' shape (size 1 along the reduced axes)."""
    if p.mask is None:
        m = jnp.asarray(p.layout.values_per_stat, dtype)
    else:
        axes = p.layout.stat_axes
        full = jnp.broadcast_to(p.mask, tuple(n if a in axes else k for a, (n, k) in
                                              enumerate(zip(p.layout.view, p.mask.shape))))
        m = jnp.sum(full.astype(dtype), axis=axes, keepdims=True)
    return m if p.config.axis_name is None else psum(m, p.config.axis_name)


def new_state(p: Prepared, mean: jax.Array, var: jax.Array) -> BatchNormState:
    """The running statistics after a train step with batch statistics ``mean``, ``var``.

    Virtual batches (ghost batch norm) contribute the mean of their statistics; with
    ``running_var="unbiased"`` the variance enters as ``var * m / (m - 1)``. With a mask, a
    feature without a valid entry keeps its running statistics.
    """
    mean, var = jax.lax.stop_gradient((mean, var))
    if p.running_var == "unbiased" or p.mask is not None:
        m = _values_per_statistic(p, var.dtype)
    if p.running_var == "unbiased":
        var = var * jnp.where(m > 1, m / jnp.maximum(m - 1, 1), 1.0)
    if p.layout.group_axes:
        mean, var = (jnp.mean(a, axis=p.layout.group_axes) for a in (mean, var))
    new = update_state(p.state, mean.reshape(-1), var.reshape(-1), p.momentum)
    if p.mask is None:
        return new
    # A feature without a valid entry has no statistics: keep its running ones.
    seen = jnp.sum(m, axis=p.layout.group_axes).reshape(-1) > 0
    count = new.count
    if count is not None and p.state.count is not None:
        count = jnp.where(jnp.any(seen), count, p.state.count)
    return BatchNormState(jnp.where(seen, new.mean, p.state.mean),
                          jnp.where(seen, new.var, p.state.var), count)


def update_state(state: BatchNormState, mean: jax.Array, var: jax.Array,
                 momentum: float | None) -> BatchNormState:
    """``momentum * running + (1 - momentum) * batch`` for both statistics, without gradient;
    ``momentum=None``: the cumulative average, ``running + (batch - running) / (count + 1)``.
    The counter, where the state has one, goes up by one. The arithmetic runs in the wider of
    the state's and the batch's dtypes (explicitly: strict dtype promotion holds); the result
    keeps the state's."""
    mean, var = jax.lax.stop_gradient((mean, var))
    count = None if state.count is None else state.count + 1

    def update(old, batch):
        dtype = _checks.common_dtype(old.dtype, batch.dtype)
        old_, batch_ = old.astype(dtype), batch.astype(dtype)
        if momentum is None:
            assert count is not None  # prepare() requires a counter for momentum=None
            new = old_ + (batch_ - old_) / count.astype(_checks.real_dtype(dtype))
        else:
            new = momentum * old_ + (1.0 - momentum) * batch_
        return new.astype(old.dtype)

    return BatchNormState(update(state.mean, mean), update(state.var, var), count)
