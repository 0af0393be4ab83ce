"""Which public names the reference pages must document, and which they miss.

A public name is every entry of ``__all__`` of the modules in :data:`MODULES`. A page documents
an object with an autodoc directive (``.. autofunction:: jaxbn.batch_norm``, ``autoclass``,
``autodata``) or with ``.. automodule:: M`` and an explicit ``:members: a, b, c`` list; a name
counts as documented when a directive names the *same object* (so ``jaxbn.cs231n``'s re-exports
are covered by their modules' pages). ``docs/conf.py`` turns every miss into a build warning
(an error in the strict build) and ``tests/test_docs.py`` checks the same without Sphinx.
"""

from __future__ import annotations

import importlib
import pathlib
import re

MODULES = [
    "jaxbn", "jaxbn.nets", "jaxbn.training", "jaxbn.testing", "jaxbn.torch_compat",
    "jaxbn.reference", "jaxbn.cs231n", "jaxbn.cs231n.layers", "jaxbn.cs231n.layer_utils",
    "jaxbn.cs231n.classifiers.fc_net", "jaxbn.cs231n.optim", "jaxbn.cs231n.solver",
    "jaxbn.cs231n.gradient_check", "jaxbn.cs231n.data_utils", "jaxbn.flax.nnx",
    "jaxbn.flax.linen", "jaxbn.equinox",
]
DOCS = pathlib.Path(__file__).resolve().parent
_DIRECTIVE = re.compile(r"^\.\. auto(?:function|class|data|exception|decorator)::\s*(\S+)", re.M)
_MODULE = re.compile(r"^\.\. automodule::\s*(\S+)\n((?:[ \t]+\S.*\n?)*)", re.M)
_MEMBERS = re.compile(r":members:\s*((?:[^:\n]+\n?)+)")


def documented_names(docs: pathlib.Path = DOCS) -> set[str]:
    """Dotted names that the pages' autodoc directives document."""
    names = set()
    for page in docs.rglob("*.md"):
        text = page.read_text()
        names.update(_DIRECTIVE.findall(text))
        for module, options in _MODULE.findall(text):
            members = _MEMBERS.search(options)
            if members:
                names.update(f"{module}.{m.strip()}" for m in members.group(1).split(",")
                             if m.strip())
    return names


def _resolve(dotted: str):
    """The object a dotted name stands for (None if nothing does)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part, None)
        return obj
    return None


def missing(docs: pathlib.Path = DOCS) -> list[str]:
    """Public names that no page documents, as ``module.name``."""
    documented = [_resolve(n) for n in documented_names(docs)]
    ids = {id(obj) for obj in documented if obj is not None}
    out = []
    for module in MODULES:
        mod = importlib.import_module(module)
        out += [f"{module}.{name}" for name in mod.__all__ if id(getattr(mod, name)) not in ids]
    return out
