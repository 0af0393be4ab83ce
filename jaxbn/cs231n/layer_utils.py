"""``cs231n/layer_utils.py``: the sandwich layers the notebooks import, built from
:mod:`jaxbn.cs231n.layers` (no second copy of any layer)."""

from __future__ import annotations

from jaxbn.cs231n.layers import (
    affine_backward,
    affine_forward,
    batchnorm_backward_alt,
    batchnorm_forward,
    layernorm_backward,
    layernorm_forward,
    relu_backward,
    relu_forward,
)

__all__ = ["affine_relu_forward", "affine_relu_backward", "affine_bn_relu_forward",
           "affine_bn_relu_backward", "affine_ln_relu_forward", "affine_ln_relu_backward"]


def affine_relu_forward(x, w, b):
    """affine - relu; returns ``(out, cache)``."""
    a, fc_cache = affine_forward(x, w, b)
    out, relu_cache = relu_forward(a)
    return out, (fc_cache, relu_cache)


def affine_relu_backward(dout, cache):
    """Returns ``(dx, dw, db)``."""
    fc_cache, relu_cache = cache
    return affine_backward(relu_backward(dout, relu_cache), fc_cache)


def _affine_norm_relu_forward(x, w, b, gamma, beta, param, norm_forward):
    a, fc_cache = affine_forward(x, w, b)
    normalized, norm_cache = norm_forward(a, gamma, beta, param)
    out, relu_cache = relu_forward(normalized)
    return out, (fc_cache, norm_cache, relu_cache)


def _affine_norm_relu_backward(dout, cache, norm_backward):
    fc_cache, norm_cache, relu_cache = cache
    da, dgamma, dbeta = norm_backward(relu_backward(dout, relu_cache), norm_cache)
    return (*affine_backward(da, fc_cache), dgamma, dbeta)


def affine_bn_relu_forward(x, w, b, gamma, beta, bn_param):
    """affine - batch norm - relu; ``bn_param`` is updated in place as in ``batchnorm_forward``."""
    return _affine_norm_relu_forward(x, w, b, gamma, beta, bn_param, batchnorm_forward)


def affine_bn_relu_backward(dout, cache):
    """Returns ``(dx, dw, db, dgamma, dbeta)``."""
    return _affine_norm_relu_backward(dout, cache, batchnorm_backward_alt)


def affine_ln_relu_forward(x, w, b, gamma, beta, ln_param):
    """affine - layer norm - relu."""
    return _affine_norm_relu_forward(x, w, b, gamma, beta, ln_param, layernorm_forward)


def affine_ln_relu_backward(dout, cache):
    """Returns ``(dx, dw, db, dgamma, dbeta)``."""
    return _affine_norm_relu_backward(dout, cache, layernorm_backward)
