"""Every public function and class of jaxbn shows how it is called: its docstring has a runnable
example (``>>>``), which the test command runs as a doctest (``--doctest-modules jaxbn``)."""

from __future__ import annotations

import importlib
import inspect

import pytest

PUBLIC_MODULES = ["jaxbn", "jaxbn.nets", "jaxbn.training", "jaxbn.testing", "jaxbn.torch_compat",
                  "jaxbn.reference", "jaxbn.cs231n", "jaxbn.cs231n.layers",
                  "jaxbn.cs231n.layer_utils", "jaxbn.cs231n.optim", "jaxbn.cs231n.solver",
                  "jaxbn.cs231n.classifiers.fc_net", "jaxbn.cs231n.gradient_check",
                  "jaxbn.cs231n.data_utils", "jaxbn.flax.nnx", "jaxbn.flax.linen",
                  "jaxbn.equinox"]


def _public(module_name: str):
    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield f"{module_name}.{name}", obj


NAMES = sorted({qualified: obj for m in PUBLIC_MODULES for qualified, obj in _public(m)}.items())


def test_the_list_covers_every_public_module():
    import jaxbn
    assert set(jaxbn._SUBMODULES) <= {m.split(".")[1] for m in PUBLIC_MODULES if "." in m}
    assert len(NAMES) > 80  # the parse found the names: the check itself is not empty


@pytest.mark.parametrize("name,obj", NAMES, ids=[n for n, _ in NAMES])
def test_public_name_has_a_runnable_example(name, obj):
    assert obj.__doc__ and ">>> " in obj.__doc__, f"{name}'s docstring has no >>> example"
