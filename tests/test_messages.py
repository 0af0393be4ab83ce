"""Errors that say the fix: each message a new user met, eagerly and under the user's jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

X = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
G, B = np.ones(3, np.float32), np.zeros(3, np.float32)
STATE = jaxbn.init_batch_norm_state(3)


@pytest.mark.parametrize("option", ["train", "momentum", "eps"])
def test_traced_option_says_to_mark_it_static(option):
    values = {"train": True, "momentum": 0.9, "eps": 1e-5}
    fn = lambda x, v: jaxbn.batch_norm(x, G, B, STATE, **{**values, option: v})[0]
    with pytest.raises(TypeError, match=rf"{option} must be .*traced value.*mark it static "
                                        rf"\(jax.jit\(f, static_argnames=\('{option}',\)\)\) or "
                                        rf"close over it"):
        jax.jit(fn)(X, values[option])
    # The fix the message names works.
    jitted = jax.jit(lambda x, v: jaxbn.batch_norm(x, G, B, STATE, **{**values, option: v})[0],
                     static_argnames=("v",))
    np.testing.assert_allclose(jitted(X, v=values[option]), fn(X, values[option]), rtol=1e-6)


def test_jit_of_the_public_function_itself_says_the_fix():
    with pytest.raises(TypeError, match="static_argnames=\\('train',\\)"):
        jax.jit(jaxbn.batch_norm)(X, G, B, STATE, train=True)
    y, _ = jax.jit(jaxbn.batch_norm, static_argnames=("train",))(X, G, B, STATE, train=True)
    assert y.shape == X.shape


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("backward", ["alt", "graph"])
def test_jvp_through_a_hand_written_rule_says_autodiff_supports_forward_mode(backward, jit):
    fn = lambda x: jaxbn.batch_norm(x, G, B, STATE, train=True, backward=backward)[0]
    jvp = lambda x: jax.jvp(fn, (x,), (x,))
    with pytest.raises(TypeError, match="Pass backward='autodiff' for forward-mode"):
        (jax.jit(jvp) if jit else jvp)(X)
    ok = lambda x: jaxbn.batch_norm(x, G, B, STATE, train=True, backward="autodiff")[0]
    assert jax.jvp(ok, (X,), (X,))[1].shape == X.shape
    with pytest.raises(TypeError, match="backward='autodiff'"):
        jax.jvp(lambda x: jaxbn.layer_norm(x, G, B, backward=backward), (X,), (X,))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_per_example_vmap_without_axis_name_says_to_pass_it(jit):
    one = lambda xi: jaxbn.batch_norm(xi[None], G, B, STATE, train=True)[0]
    run = jax.vmap(one)
    with pytest.raises(ValueError, match="at least 2 values per feature.*Pass axis_name= \\(the "
                                         "vmap's axis_name\\) so that the vmapped axis becomes "
                                         "the batch"):
        (jax.jit(run) if jit else run)(X)
    fixed = jax.vmap(lambda xi: jaxbn.batch_norm(xi[None], G, B, STATE, train=True,
                                                 axis_name="i")[0], axis_name="i")
    np.testing.assert_allclose(fixed(X)[:, 0], jaxbn.batch_norm(X, G, B, STATE, train=True)[0],
                               rtol=1e-5, atol=1e-6)


NHWC = np.ones((8, 32, 32, 3), np.float32)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("fn", ["spatial_batch_norm", "group_norm"])
def test_nhwc_data_with_the_default_layout_names_the_fix(fn, jit):
    def call(x):
        if fn == "spatial_batch_norm":
            return jaxbn.spatial_batch_norm(x, G, B, STATE, train=True)[0]
        return jaxbn.group_norm(x, G, B, groups=1)

    with pytest.raises(ValueError, match=r"gamma must have shape \(32,\).*With layout='NCHW' the "
                                         r"channel axis is 1 \(size 32\); for \(N, H, W, C\) data "
                                         r"pass layout='NHWC'"):
        (jax.jit(call) if jit else call)(NHWC)


def test_channels_equal_to_height_is_documented_where_users_look():
    """C == H cannot be told apart from the shapes: the first docstring lines and README say so."""
    import pathlib

    for fn in (jaxbn.spatial_batch_norm, jaxbn.group_norm):
        head = "\n".join(fn.__doc__.splitlines()[:12])
        assert "NHWC" in head and "C == H" in head, fn.__name__
    readme = (pathlib.Path(jaxbn.__file__).parents[1] / "README.md").read_text()
    assert "C == H" in readme


def test_momentum_convention_is_in_the_first_docstring_lines_and_readme():
    import pathlib

    head = "\n".join(jaxbn.batch_norm.__doc__.splitlines()[:8])
    assert "weights the *old* running value" in head and "PyTorch's momentum=0.1" in head
    readme = (pathlib.Path(jaxbn.__file__).parents[1] / "README.md").read_text()
    assert "PyTorch's `momentum=0.1` is `momentum=0.9` here" in readme


def test_legitimate_momenta_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for momentum in (0.0, 0.1, 0.5, 0.9, 0.99, 1.0):
            jaxbn.batch_norm(X, G, B, STATE, train=True, momentum=momentum)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_parameter_errors_point_the_right_way(jit):
    x = np.ones((8, 16, 4, 4), np.float32)
    state = jaxbn.init_batch_norm_state(16)
    ones = jnp.ones(16)

    def spatial(x):  # cs231n's group-norm notebook passes gamma as (1, C, 1, 1)
        return jaxbn.spatial_batch_norm(x, ones.reshape(1, 16, 1, 1), ones, state, train=True)[0]

    def flat(x):  # images given to batch_norm: the feature axis is the last one by default
        return jaxbn.batch_norm(x, ones, ones, state, train=True)[0]

    wrap = jax.jit if jit else (lambda f: f)
    with pytest.raises(ValueError, match=r"\(16,\).*got shape \(1, 16, 1, 1\)\. It holds the "
                                         r"right number of values: pass gamma\.reshape\(-1\)") as e:
        wrap(spatial)(x)
    assert "NHWC" not in str(e.value)
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\).*pass axis=1.*"
                                         r"jaxbn\.spatial_batch_norm"):
        wrap(flat)(x)
