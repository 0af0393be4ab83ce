"""The layout seam: how every normalization sees its input.

Each normalization is "statistics over some axes of a view of x, parameters along others". Which
axes, and which free reshape of x gives the view, is decided here and nowhere else: the public
functions, the cs231n layer, the benchmark and the tests all ask :func:`layout`.

Shape legend: ``N`` batch, ``D`` features, ``C`` channels, ``G`` groups, ``K`` virtual batch size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

NORMS = ("batch", "layer", "group")  # what layout() is asked for; "instance" is a kind of group
# Image layouts: channels-first ("NC...") or channels-last ("N...C"), one letter per axis.
IMAGE_LAYOUTS = ("NCHW", "NHWC", "NCW", "NWC", "NCDHW", "NDHWC")


class Layout(NamedTuple):
    """How a normalization views ``x``: the answer of :func:`layout`, decided once per call.

    Every later step reads these facts; nothing downstream re-derives them from array shapes.
    """

    kind: str  # "batch", "layer", "group" or "instance" (group norm with one channel a group)
    shape: tuple[int, ...]  # x's shape
    view: tuple[int, ...]  # x.reshape(view) is free (no copy): the shape the core works on
    stat_axes: tuple[int, ...]  # axes of the view the statistics reduce over
    param_axes: tuple[int, ...]  # axes of the view gamma and beta vary along
    param_shape: tuple[int, ...]  # the shape of gamma, beta and the running statistics
    feature_axis: int | None  # axis of x the parameters vary along (None: several, layer norm)
    group_axes: tuple[int, ...] = ()  # axes of the view holding virtual batches (averaged for
    #                                   the running statistics)
    image_layout: str | None = None  # "NCHW", "NHWC", ... when the call named one

    @property
    def param_view(self) -> tuple[int, ...]:
        """``gamma.reshape(param_view)`` broadcasts against the view."""
        return tuple(n if a in self.param_axes else 1 for a, n in enumerate(self.view))

    @property
    def grad_axes(self) -> tuple[int, ...]:
        """Axes of the view the gradients of gamma and beta sum over."""
        return tuple(a for a in range(len(self.view)) if a not in self.param_axes)

    @property
    def values_per_stat(self) -> int:
        """Values per statistic (on this device)."""
        return int(np.prod([self.view[a] for a in self.stat_axes], dtype=np.int64))

    @property
    def native_view(self) -> tuple[int, int, int] | None:
        """``(rows, channels, inner)``: x as rows of one feature axis of inner values, the
        batch-norm kernel's layout (a free reshape), for batch norm over every axis but the
        feature axis; None for every other normalization."""
        c = self.feature_axis
        if self.kind != "batch" or c is None or self.group_axes or not all(self.shape):
            return None
        return (int(np.prod(self.shape[:c], dtype=np.int64)), self.shape[c],
                int(np.prod(self.shape[c + 1:], dtype=np.int64)))

    @property
    def position_shape(self) -> tuple[int, ...]:
        """x's shape with size 1 along the feature axis: one entry per position."""
        return tuple(1 if a == self.feature_axis else n for a, n in enumerate(self.shape))

    @property
    def position_view(self) -> tuple[int, ...]:
        """The view with size 1 along the parameter axes (``position_shape`` in the view)."""
        return tuple(1 if a in self.param_axes else n for a, n in enumerate(self.view))

    def param_error(self, name: str, got: tuple[int, ...]) -> ValueError:
        """The error for a parameter of shape ``got``, with the fix that fits what came."""
        got = tuple(int(n) for n in got)
        what = "one value per feature" if len(self.param_shape) == 1 else "x's trailing shape"
        message = f"{name} must have shape {self.param_shape}, {what}; got shape {got}."
        return ValueError(message + self._param_hint(name, got))

    def _param_hint(self, name: str, got: tuple[int, ...]) -> str:
        size = int(np.prod(got, dtype=np.int64))
        if len(self.param_shape) != 1:
            return ""
        if size == self.param_shape[0]:
            return (f" It holds the right number of values: pass {name}.reshape(-1) (shapes "
                    f"that would broadcast are refused rather than broadcast silently).")
        if self.image_layout is not None:
            other = _other_layout(self.image_layout)
            if self.shape[channel_axis(other, len(self.shape))] == size:
                return _layout_hint(self.shape, self.image_layout)
            return ""
        axis = self.feature_axis
        matches = [a for a, n in enumerate(self.shape) if n == size and a != axis]
        if self.kind != "batch" or axis is None or not matches:
            return ""
        hint = (f" batch_norm normalizes along axis={axis - len(self.shape)} "
                f"(size {self.shape[axis]}) here; {name} matches axis "
                f"{matches[0]} (size {size}): pass axis={matches[0]}.")
        if len(self.shape) >= 3:
            hint += (" For images use jaxbn.spatial_batch_norm(x, ..., layout='NCHW' or "
                     "'NHWC').")
        return hint

    def mask_view(self, mask_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The view a mask of x's shape without the feature axis takes, or None if it cannot."""
        if self.feature_axis is None:
            expected = self.shape[:len(self.shape) - len(self.param_shape)]
        else:
            expected = tuple(n for a, n in enumerate(self.shape) if a != self.feature_axis)
        if len(mask_shape) != len(expected) or any(m not in (1, n) for m, n in
                                                   zip(mask_shape, expected)):
            return None
        full = list(mask_shape)
        if self.feature_axis is None:
            full += [1] * len(self.param_shape)
        else:
            full.insert(self.feature_axis, 1)
        return tuple(full)


def channel_axis(image_layout: str, ndim: int) -> int:
    """Axis of the channels in an image layout: 1 channels-first, the last channels-last."""
    return 1 if image_layout.startswith("NC") else ndim - 1


def layout(shape: tuple[int, ...], norm: str, *, axis: int = -1, image_layout: str | None = None,
           groups: int = 1, virtual_batch_size: int | None = None, num_axes: int = 1,
           axes: tuple[int, ...] | None = None,
           param_axes: tuple[int, ...] | None = None) -> Layout:
    """The view, statistics axes and parameter shape of a normalization of an ``x`` of ``shape``.

    - ``"batch"``: parameters along the feature axis (``axis``, or the channel axis of
      ``image_layout``), statistics over every other axis. ``virtual_batch_size=K`` splits the
      batch axis into ``(N / K, K)`` and keeps one set of statistics per virtual batch.
    - ``"layer"``: parameters and statistics over the last ``num_axes`` axes; or statistics over
      ``axes`` and parameters along ``param_axes`` (any axes of x, as Flax's ``reduction_axes``
      and ``feature_axes``).
    - ``"group"``: parameters along the channel axis (``axis``, or that of ``image_layout``); the
      channel axis split into ``(G, C / G)`` and statistics over the channels of a group and
      ``axes`` (default: every axis but the batch axis 0 and the channels).

    Arguments are trusted to be checked (axes normalized and distinct, ``image_layout`` matching
    the rank, ``groups``/``virtual_batch_size`` dividing their axis); see
    :func:`check_image_layout`.
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if image_layout is not None:
        axis = channel_axis(image_layout, ndim)
    if norm == "layer":
        if axes is None:
            axes = param_axes = tuple(range(ndim - num_axes, ndim))
        params = tuple(sorted(axes if param_axes is None else param_axes))
        return Layout("layer", shape, shape, tuple(sorted(axes)), params,
                      tuple(shape[a] for a in params), None, image_layout=image_layout)
    if norm == "batch":
        if virtual_batch_size is None or virtual_batch_size == shape[0]:
            stat = tuple(a for a in range(ndim) if a != axis)
            return Layout("batch", shape, shape, stat, (axis,), (shape[axis],), axis,
                          image_layout=image_layout)
        # (N, ...) -> (N / K, K, ...): axis 0 indexes the virtual batches.
        view = (shape[0] // virtual_batch_size, virtual_batch_size) + shape[1:]
        stat = tuple(a for a in range(1, ndim + 1) if a != axis + 1)
        return Layout("batch", shape, view, stat, (axis + 1,), (shape[axis],), axis, (0,),
                      image_layout)
    # Group norm: (..., C, ...) -> (..., G, C / G, ...), a free reshape; x's axis a > C is the
    # view's a + 1.
    view = shape[:axis] + (groups, shape[axis] // groups) + shape[axis + 1:]
    if axes is None:
        axes = tuple(a for a in range(1, ndim) if a != axis)
    stat = tuple(sorted([a + (a > axis) for a in axes if a != axis] + [axis + 1]))
    kind = "instance" if groups == shape[axis] else "group"
    return Layout(kind, shape, view, stat, (axis, axis + 1), (shape[axis],), axis,
                  image_layout=image_layout)


def _layout_hint(shape: tuple[int, ...], image_layout: str) -> str:
    """Names the layout in use, its channel axis, and the other layout of the same rank."""
    axis = channel_axis(image_layout, len(shape))
    other = _other_layout(image_layout)
    spatial = ", ".join(image_layout[1:-1] if image_layout.endswith("C") else image_layout[2:])
    other_shape = f"(N, {spatial}, C)" if other.endswith("C") else f"(N, C, {spatial})"
    return (f" With layout={image_layout!r} the channel axis is {axis} (size {shape[axis]}); "
            f"for {other_shape} data pass layout={other!r}.")


def _other_layout(image_layout: str) -> str:
    if image_layout.startswith("NC"):
        return "N" + image_layout[2:] + "C"
    return "NC" + image_layout[1:-1]


def check_image_layout(name: str, image_layout: Any, shape: tuple[int, ...],
                       allowed: tuple[str, ...] = IMAGE_LAYOUTS) -> None:
    """``image_layout`` must be a known layout with one letter per axis of ``x``."""
    if not isinstance(image_layout, str) or image_layout not in allowed:
        choices = ", ".join(repr(c) for c in allowed)
        raise ValueError(f"{name} must be one of {choices}; got {image_layout!r}.")
    if len(image_layout) != len(shape):
        same_rank = [c for c in allowed if len(c) == len(shape)]
        fix = (f" For rank-{len(shape)} data pass layout=" + " or ".join(map(repr, same_rank))
               + "." if same_rank else "")
        raise ValueError(f"x must have {len(image_layout)} dimensions for layout "
                         f"{image_layout!r}; got shape {tuple(shape)}.{fix}")


def check_virtual_batch_size(virtual_batch_size: Any, shape: tuple[int, ...],
                             feature_axis: int) -> int | None:
    """A positive int that divides the batch (axis 0, which must not be the feature axis)."""
    if virtual_batch_size is None:
        return None
    if (isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, (int, np.integer)) or virtual_batch_size < 1):
        raise ValueError(f"virtual_batch_size must be a positive int; got {virtual_batch_size!r}.")
    if feature_axis == 0:
        raise ValueError("virtual_batch_size splits the batch axis 0, but axis 0 is the feature "
                         "axis here; put the batch first.")
    if shape[0] % virtual_batch_size:
        raise ValueError(f"virtual_batch_size must divide the batch of {shape[0]} examples (axis "
                         f"0 of x, shape {tuple(shape)}); got {virtual_batch_size}.")
    return int(virtual_batch_size)
