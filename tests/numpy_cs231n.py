"""An independent numpy implementation of the assignment's layers, written from the math.

Nothing here imports jaxbn: it is what jaxbn.cs231n is compared against, in float64.
"""

from __future__ import annotations

import numpy as np


def batchnorm_forward(x, gamma, beta, bn_param):
    eps, momentum = bn_param.get("eps", 1e-5), bn_param.get("momentum", 0.9)
    d = x.shape[1]
    running_mean = bn_param.get("running_mean", np.zeros(d))
    running_var = bn_param.get("running_var", np.zeros(d))
    if bn_param["mode"] == "train":
        mu = x.mean(axis=0)
        var = ((x - mu) ** 2).mean(axis=0)
        x_hat = (x - mu) / np.sqrt(var + eps)
        out = gamma * x_hat + beta
        bn_param["running_mean"] = momentum * running_mean + (1 - momentum) * mu
        bn_param["running_var"] = momentum * running_var + (1 - momentum) * var
        return out, (x_hat, gamma, np.sqrt(var + eps))
    out = gamma * (x - running_mean) / np.sqrt(running_var + eps) + beta
    return out, None


def batchnorm_backward(dout, cache):
    """dx = gamma / (m * std) * (m * dout - sum(dout) - x_hat * sum(dout * x_hat))."""
    x_hat, gamma, std = cache
    m = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx = gamma / (m * std) * (m * dout - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


def layernorm_forward(x, gamma, beta, eps=1e-5):
    # Layer norm of x is batch norm of x.T with gamma/beta applied afterwards.
    mu = x.mean(axis=1, keepdims=True)
    std = np.sqrt(((x - mu) ** 2).mean(axis=1, keepdims=True) + eps)
    x_hat = (x - mu) / std
    return gamma * x_hat + beta, (x_hat, gamma, std)


def layernorm_backward(dout, cache):
    x_hat, gamma, std = cache
    dgamma = (dout * x_hat).sum(axis=0)
    dbeta = dout.sum(axis=0)
    g = dout * gamma
    d = g.shape[1]
    dx = (d * g - g.sum(axis=1, keepdims=True)
          - x_hat * (g * x_hat).sum(axis=1, keepdims=True)) / (d * std)
    return dx, dgamma, dbeta


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    n, c, h, w = x.shape
    flat = x.transpose(0, 2, 3, 1).reshape(-1, c)
    out, cache = batchnorm_forward(flat, gamma, beta, bn_param)
    return out.reshape(n, h, w, c).transpose(0, 3, 1, 2), cache


def spatial_batchnorm_backward(dout, cache):
    n, c, h, w = dout.shape
    dx, dgamma, dbeta = batchnorm_backward(dout.transpose(0, 2, 3, 1).reshape(-1, c), cache)
    return dx.reshape(n, h, w, c).transpose(0, 3, 1, 2), dgamma, dbeta


def groupnorm_forward(x, gamma, beta, groups, eps=1e-5):
    n, c, h, w = x.shape
    rows = x.reshape(n * groups, -1)
    mu = rows.mean(axis=1, keepdims=True)
    std = np.sqrt(((rows - mu) ** 2).mean(axis=1, keepdims=True) + eps)
    x_hat = ((rows - mu) / std).reshape(x.shape)
    return gamma * x_hat + beta, (x_hat, gamma, std, groups)


def groupnorm_backward(dout, cache):
    x_hat, gamma, std, groups = cache
    n, c, h, w = dout.shape
    dgamma = (dout * x_hat).sum(axis=(0, 2, 3), keepdims=True)
    dbeta = dout.sum(axis=(0, 2, 3), keepdims=True)
    g = (dout * gamma).reshape(n * groups, -1)
    xh = x_hat.reshape(n * groups, -1)
    m = g.shape[1]
    dx = ((m * g - g.sum(axis=1, keepdims=True) - xh * (g * xh).sum(axis=1, keepdims=True))
          / (m * std))
    return dx.reshape(dout.shape), dgamma, dbeta


def softmax_loss(scores, y):
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = scores.shape[0]
    loss = -log_probs[np.arange(n), y].mean()
    dx = np.exp(log_probs)
    dx[np.arange(n), y] -= 1
    return loss, dx / n


def fcn_loss(params, X, y, num_layers, normalization, reg, eps=1e-5):
    """The FullyConnectedNet loss in train mode without dropout."""
    h = X.reshape(X.shape[0], -1)
    for i in range(1, num_layers):
        h = h @ params[f"W{i}"] + params[f"b{i}"]
        if normalization == "batchnorm":
            h = batchnorm_forward(h, params[f"gamma{i}"], params[f"beta{i}"], {"mode": "train"})[0]
        elif normalization == "layernorm":
            h = layernorm_forward(h, params[f"gamma{i}"], params[f"beta{i}"], eps)[0]
        h = np.maximum(h, 0)
    scores = h @ params[f"W{num_layers}"] + params[f"b{num_layers}"]
    loss = softmax_loss(scores, y)[0]
    return loss + 0.5 * reg * sum(np.sum(params[f"W{i}"] ** 2) for i in range(1, num_layers + 1))


# --- optimizers, written from the update equations -------------------------------------------

def momentum_step(w, dw, lr, mu, v):
    v = mu * v - lr * dw
    return w + v, v


def rmsprop_step(w, dw, lr, rho, eps, cache):
    cache = rho * cache + (1 - rho) * dw ** 2
    return w - lr * dw / (np.sqrt(cache) + eps), cache


def adam_step(w, dw, lr, b1, b2, eps, m, v, t):
    t = t + 1
    m = b1 * m + (1 - b1) * dw
    v = b2 * v + (1 - b2) * dw ** 2
    step = lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return w - step, m, v, t
