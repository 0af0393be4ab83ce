"""A small demo: a two-hidden-layer net with batch norm trained with optax on the digits data set.

Run with ``python -m experiments.demo``. It prints the loss and the train/validation accuracy per
epoch, in train mode (batch statistics) and test mode (running statistics) respectively.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = data.data.astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], data.target[order].astype(np.int32)
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def init(key, sizes):
    params, states = [], []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        layer = {"w": jax.random.normal(sub, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in),
                 "b": jnp.zeros(fan_out)}
        if i < len(sizes) - 2:
            layer.update(gamma=jnp.ones(fan_out), beta=jnp.zeros(fan_out))
            states.append(jaxbn.init_batch_norm_state(fan_out))
        params.append(layer)
    return params, states


def apply(params, states, x, *, train):
    new_states = []
    for layer, state in zip(params[:-1], states):
        h, state = jaxbn.batch_norm(x @ layer["w"] + layer["b"], layer["gamma"], layer["beta"],
                                    state, train=train)
        x = jax.nn.relu(h)
        new_states.append(state)
    return x @ params[-1]["w"] + params[-1]["b"], new_states


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    (x_train, y_train), (x_val, y_val) = load_digits(args.seed)
    params, states = init(jax.random.key(args.seed), [64, 100, 100, 10])
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    def loss_fn(params, states, x, y):
        scores, states = apply(params, states, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(scores, y).mean(), states

    @jax.jit
    def step(params, states, opt_state, x, y):
        (loss, states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, states, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), states, opt_state, loss

    accuracy = jax.jit(lambda p, s, x, y: jnp.mean(apply(p, s, x, train=False)[0].argmax(-1) == y))
    rng = np.random.default_rng(args.seed)
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order) - 49, 50):
            idx = order[start:start + 50]
            params, states, opt_state, loss = step(params, states, opt_state, x_train[idx],
                                                   y_train[idx])
        print(f"epoch {epoch}: loss {float(loss):.4f}  "
              f"train acc {float(accuracy(params, states, x_train, y_train)):.3f}  "
              f"val acc {float(accuracy(params, states, x_val, y_val)):.3f}")


if __name__ == "__main__":
    main()
