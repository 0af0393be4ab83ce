"""The framework adapters' shared seam: optional imports and the translation of Flax's
conventions (axes, masks) into jaxbn's."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxbn import _adapter


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_import_jaxbn_imports_no_framework_and_resolves_the_submodules_lazily():
    done = _run("import sys, types, jaxbn\n"
                "lazy = sorted(m for m in ('jaxbn.nets', 'jaxbn.training', 'jaxbn.cs231n') "
                "if m in sys.modules)\n"
                "names = ('torch_compat', 'nets', 'training', 'testing', 'cs231n', 'reference')\n"
                "mods = [getattr(jaxbn, n) for n in names]\n"
                "assert all(isinstance(m, types.ModuleType) for m in mods), mods\n"
                "assert jaxbn.cs231n.layers.batchnorm_forward and jaxbn.nets.init_mlp\n"
                "print(lazy, sorted(m for m in ('flax', 'equinox', 'torch') if m in sys.modules))\n"
                "jaxbn.equinox.BatchNorm, jaxbn.flax.nnx.BatchNorm\n"
                "print(sorted(m for m in ('flax', 'equinox') if m in sys.modules))\n"
                "try:\n    jaxbn.tensorflow\nexcept AttributeError as e:\n    print(e)")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "[] []"  # nothing imported before it is used; no framework at all
    assert lines[1] == "['equinox', 'flax']"  # the adapters, when asked for
    assert lines[2] == "module 'jaxbn' has no attribute 'tensorflow'"


@pytest.mark.parametrize("module, blocked, extra", [
    ("jaxbn.flax.nnx", "flax", "flax"),
    ("jaxbn.flax.linen", "flax", "flax"),
    ("jaxbn.equinox", "equinox", "equinox"),
], ids=["nnx", "linen", "equinox"])
def test_adapter_without_its_framework_says_which_extra_to_install(module, blocked, extra):
    # sys.modules[name] = None makes `import name` fail as if it were not installed.
    done = _run(f"import sys; sys.modules[{blocked!r}] = None\n"
                f"import jaxbn\n"
                f"import {module}")
    assert done.returncode != 0
    assert "ImportError" in done.stderr
    assert f"pip install 'jaxbn[{extra}]'" in done.stderr


def test_flax_masks_take_x_s_rank_and_may_vary_along_the_features():
    mask = jnp.arange(4)[:, None] % 2 == 0  # broadcasts against x of shape (6, 4, 3)
    assert _adapter.flax_mask(mask, 3).shape == (1, 4, 1)
    assert _adapter.flax_mask(jnp.ones((6, 4, 3), bool), 3).shape == (6, 4, 3)  # per entry
    assert _adapter.flax_mask(None, 3) is None
    with pytest.raises(TypeError, match="boolean"):
        _adapter.flax_mask(jnp.ones((6, 1, 1)), 3)
    with pytest.raises(ValueError, match="broadcast"):
        _adapter.flax_mask(jnp.ones((1, 6, 4, 1), bool), 3)


def test_dtype_rules_are_the_frameworks_and_hold_under_strict_promotion():
    bf16, f32 = jnp.ones(3, jnp.bfloat16), jnp.ones(3, jnp.float32)
    with jax.numpy_dtype_promotion("strict"):
        # Flax's promote_dtype: a given dtype, else the common one (None kept).
        assert [a.dtype for a in _adapter.promote((bf16, f32, None))[:2]] == [f32.dtype] * 2
        assert _adapter.promote((f32, None), jnp.bfloat16)[0].dtype == jnp.bfloat16
        assert _adapter.promote((jnp.ones(2, jnp.int32),))[0].dtype == jnp.float32
        # Linen: statistics from x as given, dtype for the output only; x cast up, never down.
        x, out = _adapter.linen_dtypes(f32, (f32,), jnp.bfloat16)
        assert (x.dtype, out) == (jnp.float32, jnp.bfloat16)
        x, out = _adapter.linen_dtypes(bf16, (f32, None), None)
        assert (x.dtype, out) == (jnp.float32, jnp.float32)
        x, out = _adapter.linen_dtypes(bf16, (bf16,), jnp.float16)
        assert (x.dtype, out) == (jnp.float32, jnp.float16)


def test_axes_and_mode_flags_are_named():
    assert _adapter.canonical_axes("axis", -1, 3) == (2,)
    assert _adapter.canonical_axes("reduction_axes", (2, -2), 3) == (1, 2)
    with pytest.raises(ValueError, match="reduction_axes must be axes of x"):
        _adapter.canonical_axes("reduction_axes", (3,), 3)
    with pytest.raises(TypeError, match="use_running_average must be a Python bool"):
        _adapter.choose("use_running_average", jnp.array(True), None, "")
    with pytest.raises(ValueError, match="pass it"):
        _adapter.choose("use_running_average", None, None, "pass it")
    with pytest.raises(ValueError, match="^the framework's own words$"):
        _adapter.choose("deterministic", None, None, "", message="the framework's own words")
    assert _adapter.choose("deterministic", None, True, "") is True
    assert _adapter.choose("deterministic", False, True, "") is False
