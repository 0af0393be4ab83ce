"""Sphinx configuration of jaxbn's documentation: ``sphinx-build -W --keep-going docs DIR``.

The docstrings are Google style with Sphinx roles (``:func:``, ``:mod:``) and ``.. math::``, so
autodoc with napoleon renders them as they are. Pages are MyST markdown; most prose is included
from the repository's README.md (one source), and links in it to repository files that are also
pages here are rewritten to those pages (:data:`REPO_LINKS`). A public name that no reference
page documents is a warning, so the strict build fails on it (``public_api.py``).
"""

from __future__ import annotations

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, DOCS)
sys.path.insert(0, os.path.dirname(DOCS))

import docstrings  # noqa: E402
import public_api  # noqa: E402

project = "jaxbn"
author = "the jaxbn authors"
copyright = "the jaxbn authors"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon",
              "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# Docstrings: Google sections; keep the signatures' own defaults (not evaluated reprs).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"undoc-members": True, "show-inheritance": True}
# A bare ``x`` in a docstring is a code span, as in the README.
default_role = "code"

myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

html_theme = "furo"
html_title = "jaxbn"

# Repository files that README.md links to, and the page that holds each here.
REPO_LINKS = {"experiments/README.md": "experiments.md"}


def _rewrite_repo_links(app, relative_path, parent_docname, content):
    """README.md's links to repository files become links to the pages that include them."""
    for target, page in REPO_LINKS.items():
        content[0] = content[0].replace(f"]({target}", f"]({page}")


def _check_public_api(app):
    from sphinx.util import logging

    logger = logging.getLogger("jaxbn.public_api")
    for name in public_api.missing():
        logger.warning(f"public name {name} is on no reference page (docs/reference/*.md)")


def _prepare_docstring(app, what, name, obj, options, lines):
    docstrings.prepare(lines)


def setup(app):
    # Before napoleon (priority 500) turns the Google sections into fields.
    app.connect("autodoc-process-docstring", _prepare_docstring, priority=400)
    app.connect("include-read", _rewrite_repo_links)
    app.connect("builder-inited", _check_public_api)
