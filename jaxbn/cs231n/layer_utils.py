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
    """affine - relu; returns ``(out, cache)``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layer_utils import affine_relu_forward
      >>> x, w = np.random.default_rng(0).standard_normal((6, 3)), np.ones((3, 4))
      >>> out, cache = affine_relu_forward(x, w, np.zeros(4))
      >>> out.shape, bool((out >= 0).all())
      ((6, 4), True)
    """
    a, fc_cache = affine_forward(x, w, b)
    out, relu_cache = relu_forward(a)
    return out, (fc_cache, relu_cache)


def affine_relu_backward(dout, cache):
    """Returns ``(dx, dw, db)``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layer_utils import affine_relu_backward, affine_relu_forward
      >>> x, w = np.random.default_rng(0).standard_normal((6, 3)), np.ones((3, 4))
      >>> _, cache = affine_relu_forward(x, w, np.zeros(4))
      >>> grads = affine_relu_backward(np.ones((6, 4)), cache)
      >>> len(grads), grads[0].shape, grads[1].shape
      (3, (6, 3), (3, 4))
    """
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
    """affine - batch norm - relu; ``bn_param`` is updated in place as in ``batchnorm_forward``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layer_utils import affine_bn_relu_forward
      >>> x, w = np.random.default_rng(0).standard_normal((6, 3)), np.ones((3, 4))
      >>> out, cache = affine_bn_relu_forward(x, w, np.zeros(4), np.ones(4), np.zeros(4),
      ...                                     {"mode": "train"})
      >>> out.shape, bool((out >= 0).all())
      ((6, 4), True)
    """
    return _affine_norm_relu_forward(x, w, b, gamma, beta, bn_param, batchnorm_forward)


def affine_bn_relu_backward(dout, cache):
    """Returns ``(dx, dw, db, dgamma, dbeta)``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layer_utils import affine_bn_relu_backward, affine_bn_relu_forward
      >>> x, w = np.random.default_rng(0).standard_normal((6, 3)), np.ones((3, 4))
      >>> _, cache = affine_bn_relu_forward(x, w, np.zeros(4), np.ones(4), np.zeros(4),
      ...                                   {"mode": "train"})
      >>> grads = affine_bn_relu_backward(np.ones((6, 4)), cache)
      >>> len(grads), grads[0].shape, grads[1].shape
      (5, (6, 3), (3, 4))
    """
    return _affine_norm_relu_backward(dout, cache, batchnorm_backward_alt)


def affine_ln_relu_forward(x, w, b, gamma, beta, ln_param):
    """affine - layer norm - relu.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layer_utils import affine_ln_relu_forward
      >>> x, w = np.random.default_rng(0).standard_normal((6, 3)), np.ones((3, 4))
      >>> out, cache = affine_ln_relu_forward(x, w, np.zeros(4), np.ones(4), np.zeros(4), {})
      >>> out.shape, bool((out >= 0).all())
      ((6, 4), True)
    """
    return _affine_norm_relu_forward(x, w, b, gamma, beta, ln_param, layernorm_forward)


def affine_ln_relu_backward(dout, cache):
    """Returns ``(dx, dw, db, dgamma, dbeta)``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.layer_utils import affine_ln_relu_backward, affine_ln_relu_forward
      >>> x, w = np.random.default_rng(0).standard_normal((6, 3)), np.ones((3, 4))
      >>> _, cache = affine_ln_relu_forward(x, w, np.zeros(4), np.ones(4), np.zeros(4), {})
      >>> grads = affine_ln_relu_backward(np.ones((6, 4)), cache)
      >>> len(grads), grads[0].shape, grads[1].shape
      (5, (6, 3), (3, 4))
    """
    return _affine_norm_relu_backward(dout, cache, layernorm_backward)
