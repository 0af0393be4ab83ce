"""The layout seam: one function maps feature axis / image layout / groups / virtual batches to
the view, the statistics axes and the parameter shape. Expected values are written from the
definitions (which axes a normalization reduces over), not read off the implementation."""

from __future__ import annotations

import numpy as np
import pytest

from jaxbn._layout import check_image_layout, layout

CASES = [
    # (shape, norm, options, view, stat_axes, param_view, param_shape)
    ((8, 5), "batch", dict(axis=1), (8, 5), (0,), (1, 5), (5,)),
    ((4, 3, 5, 6), "batch", dict(axis=0), (4, 3, 5, 6), (1, 2, 3), (4, 1, 1, 1), (4,)),
    ((2, 3, 4, 5), "batch", dict(image_layout="NCHW"), (2, 3, 4, 5), (0, 2, 3), (1, 3, 1, 1),
     (3,)),
    ((2, 4, 5, 3), "batch", dict(image_layout="NHWC"), (2, 4, 5, 3), (0, 1, 2), (1, 1, 1, 3),
     (3,)),
    ((2, 3, 7), "batch", dict(image_layout="NCW"), (2, 3, 7), (0, 2), (1, 3, 1), (3,)),
    ((12, 5), "batch", dict(axis=1, virtual_batch_size=4), (3, 4, 5), (1,), (1, 1, 5), (5,)),
    ((12, 3, 2, 2), "batch", dict(image_layout="NCHW", virtual_batch_size=6), (2, 6, 3, 2, 2),
     (1, 3, 4), (1, 1, 3, 1, 1), (3,)),
    ((6, 5), "layer", {}, (6, 5), (1,), (1, 5), (5,)),
    ((2, 3, 4, 5), "layer", dict(num_axes=2), (2, 3, 4, 5), (2, 3), (1, 1, 4, 5), (4, 5)),
    ((2, 6, 4, 5), "group", dict(image_layout="NCHW", groups=3), (2, 3, 2, 4, 5), (2, 3, 4),
     (1, 3, 2, 1, 1), (6,)),
    ((2, 4, 5, 6), "group", dict(image_layout="NHWC", groups=2), (2, 4, 5, 2, 3), (1, 2, 4),
     (1, 1, 1, 2, 3), (6,)),
    ((2, 4, 7), "group", dict(image_layout="NCW", groups=2), (2, 2, 2, 7), (2, 3),
     (1, 2, 2, 1), (4,)),
    ((2, 3, 4, 5, 6), "group", dict(image_layout="NDHWC", groups=3), (2, 3, 4, 5, 3, 2),
     (1, 2, 3, 5), (1, 1, 1, 1, 3, 2), (6,)),
    # Flax's axes: layer norm over a middle axis; instance norm's form (parameters along an axis
    # the statistics do not reduce); group norm over the batch axis too, and over axes with a gap.
    ((2, 3, 4), "layer", dict(axes=(1,), param_axes=(1,)), (2, 3, 4), (1,), (1, 3, 1), (3,)),
    ((2, 3, 4, 5), "layer", dict(axes=(1, 2), param_axes=(3,)), (2, 3, 4, 5), (1, 2),
     (1, 1, 1, 5), (5,)),
    ((3, 4, 8), "group", dict(axis=2, groups=4, axes=(0, 1)), (3, 4, 4, 2), (0, 1, 3),
     (1, 1, 4, 2), (8,)),
    ((2, 3, 5, 2, 6), "group", dict(axis=4, groups=3, axes=(0, 1, 3)), (2, 3, 5, 2, 3, 2),
     (0, 1, 3, 5), (1, 1, 1, 1, 3, 2), (6,)),
    ((2, 6, 5), "group", dict(axis=1, groups=2, axes=(2,)), (2, 2, 3, 5), (2, 3), (1, 2, 3, 1),
     (6,)),
]


@pytest.mark.parametrize("shape,norm,options,view,stat_axes,param_view,param_shape", CASES,
                         ids=[f"{c[1]}-{'x'.join(map(str, c[0]))}-{c[2]}" for c in CASES])
def test_layout_of_each_normalization(shape, norm, options, view, stat_axes, param_view,
                                      param_shape):
    lay = layout(shape, norm, **options)
    assert (lay.view, lay.stat_axes, lay.param_view, lay.param_shape) == (
        view, stat_axes, param_view, param_shape)
    assert int(np.prod(lay.view)) == int(np.prod(shape))  # a reshape, never a copy of other size
    assert lay.values_per_stat == int(np.prod([view[a] for a in stat_axes]))


def test_parameter_error_names_the_layout_and_the_other_one():
    lay = layout((8, 5, 32, 3), "batch", image_layout="NCHW")
    message = str(lay.param_error("gamma", (3,)))
    assert "With layout='NCHW' the channel axis is 1 (size 5)" in message
    assert "for (N, H, W, C) data pass layout='NHWC'" in message
    message = str(layout((8, 3, 32, 5), "group", image_layout="NHWC").param_error("beta", (3,)))
    assert "layout='NHWC' the channel axis is 3 (size 5)" in message
    assert "(N, C, H, W) data pass layout='NCHW'" in message


def test_image_layout_checks_rank_and_name():
    with pytest.raises(ValueError, match="layout must be one of"):
        check_image_layout("layout", "CHWN", (1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"x must have 4 dimensions for layout 'NCHW'; got "
                                         r"shape \(2, 3, 4\). For rank-3 data pass "
                                         r"layout='NCW' or 'NWC'"):
        check_image_layout("layout", "NCHW", (2, 3, 4))


KINDS = [
    # (shape, norm, options, kind, native view (rows, channels, inner) or None)
    ((8, 5), "batch", dict(axis=1), "batch", (8, 5, 1)),
    ((4, 3, 5, 6), "batch", dict(axis=0), "batch", (1, 4, 90)),
    ((2, 3, 4, 5), "batch", dict(image_layout="NCHW"), "batch", (2, 3, 20)),
    ((2, 4, 5, 3), "batch", dict(image_layout="NHWC"), "batch", (40, 3, 1)),
    ((12, 5), "batch", dict(axis=1, virtual_batch_size=4), "batch", None),
    ((4, 1), "layer", {}, "layer", None),  # one feature: shaped like a batch norm of 4 rows
    ((6, 5), "layer", {}, "layer", None),
    ((2, 6, 4, 5), "group", dict(image_layout="NCHW", groups=3), "group", None),
    ((2, 6, 4, 5), "group", dict(image_layout="NCHW", groups=6), "instance", None),
    ((2, 6, 4, 5), "group", dict(image_layout="NCHW", groups=1), "group", None),
]


@pytest.mark.parametrize("shape,norm,options,kind,native_view", KINDS,
                         ids=[f"{k[3]}-{'x'.join(map(str, k[0]))}-{k[2]}" for k in KINDS])
def test_the_seam_names_the_kind_and_the_kernel_view_once(shape, norm, options, kind,
                                                          native_view):
    lay = layout(shape, norm, **options)
    assert lay.kind == kind
    assert lay.native_view == native_view
    # The parameter axes and the axes their gradients sum over split the view.
    assert sorted(lay.param_axes + lay.grad_axes) == list(range(len(lay.view)))


def test_parameter_errors_say_what_is_really_wrong():
    # cs231n's group-norm notebook shape: the right channel count, in a broadcasting shape.
    message = str(layout((8, 16, 4, 4), "batch", image_layout="NCHW").param_error(
        "gamma", (1, 16, 1, 1)))
    assert "gamma.reshape(-1)" in message and "NHWC" not in message
    # batch_norm on images: the features are on axis 1.
    message = str(layout((8, 16, 4, 4), "batch", axis=3).param_error("gamma", (16,)))
    assert "pass axis=1" in message and "jaxbn.spatial_batch_norm" in message
    # Nothing that fits: no hint that would mislead.
    message = str(layout((8, 5), "batch", axis=1).param_error("gamma", (7,)))
    assert message == "gamma must have shape (5,), one value per feature; got shape (7,)."
