"""The documentation's sources and the notebooks, checked without building or executing them (CI's
jobs 3 and 4 do that): every public name on a reference page, the README sections the pages
include still there, the docstring preparation for napoleon, the notebooks' form."""

from __future__ import annotations

import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import docstrings  # noqa: E402
import public_api  # noqa: E402


def test_every_public_name_is_on_a_reference_page():
    assert public_api.missing() == []


def test_the_reference_pages_name_objects_that_exist():
    names = public_api.documented_names()
    assert len(names) > 80
    assert [n for n in sorted(names) if public_api._resolve(n) is None] == []


def test_a_public_name_without_a_page_is_reported(tmp_path):
    page = tmp_path / "nets.md"
    page.write_text("```{eval-rst}\n.. automodule:: jaxbn.nets\n   :members: NetState, init_mlp,"
                    "\n      apply_mlp\n.. autofunction:: jaxbn.batch_norm\n```\n")
    assert {"jaxbn.nets.NetState", "jaxbn.nets.apply_mlp",
            "jaxbn.batch_norm"} <= public_api.documented_names(tmp_path)
    missing = public_api.missing(tmp_path)
    assert "jaxbn.nets.l2_penalty" in missing and "jaxbn.dropout" in missing
    assert "jaxbn.nets.init_mlp" not in missing and "jaxbn.batch_norm" not in missing


def _includes():
    pattern = re.compile(r"```\{include\} (\S+)\n((?::[\w-]+: .*\n)*)```")
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for target, options in pattern.findall(page.read_text()):
            yield page, (page.parent / target).resolve(), dict(
                re.findall(r':([\w-]+): "(.*)"', options))


def test_the_readme_sections_the_pages_include_are_there_once():
    checked = 0
    for page, target, options in _includes():
        text = target.read_text()
        for option in ("start-after", "end-before"):
            if option in options:
                assert text.count(options[option]) == 1, (page.name, option, options[option])
                checked += 1
        if {"start-after", "end-before"} <= set(options):
            assert text.index(options["start-after"]) < text.index(options["end-before"])
    assert checked >= 15


def test_docstrings_are_prepared_for_napoleon_without_changing_their_words():
    lines = ["Summary.", "", "Args:", "  x, gamma, beta,", "    mask: as in f.",
             "  *primals: the arguments.", "  **options: more.", "", "Raises:",
             "  ValueError: a long reason that", "  goes on here.", "", "Returns:",
             "  ``y``, not touched."]
    docstrings.prepare(lines)
    assert lines == ["Summary.", "", "Args:", "  x, gamma, beta, mask: as in f.",
                     "  \\*primals: the arguments.", "  \\*\\*options: more.", "", "Raises:",
                     "  ValueError: a long reason that", "    goes on here.", "", "Returns:",
                     "  ``y``, not touched."]
    untouched = ["Args:", "  x (Array): input.", "    more about x: with a colon.",
                 "  y: ``**bold**`` stays."]
    before = list(untouched)
    docstrings.prepare(untouched)
    assert untouched == before


NOTEBOOKS = {
    "BatchNormalization.ipynb": ["Batch Normalization", "Batch normalization: forward",
                                 "Batch normalization: backward",
                                 "Batch normalization: alternative backward",
                                 "Fully connected nets with batch normalization",
                                 "Batch normalization for deep networks",
                                 "Batch normalization and initialization",
                                 "Batch normalization and batch size", "Layer Normalization",
                                 "Layer normalization and batch size"],
    "Dropout.ipynb": ["Dropout", "Dropout: forward pass", "Dropout: backward pass",
                      "Fully connected nets with dropout", "Regularization experiment"],
}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebooks_follow_the_assignment_and_are_committed_without_outputs(name):
    notebook = json.loads((ROOT / "experiments" / "notebooks" / name).read_text())
    assert notebook["nbformat"] == 4
    cells = notebook["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    headings = [line.lstrip("#").strip() for c in cells if c["cell_type"] == "markdown"
                for line in "".join(c["source"]).splitlines() if line.startswith("#")]
    expected = NOTEBOOKS[name]
    assert [h for h in headings if h in expected] == expected  # all there, in the order given
    setup = "".join(code[0]["source"])
    assert 'jax.config.update("jax_enable_x64", True)' in setup
    assert ("set_dropout_p(\"keep\")" in setup) == (name == "Dropout.ipynb")
    assert "from jaxbn.cs231n" in setup
