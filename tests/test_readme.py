"""Every Python snippet in README.md runs as written (each in a fresh interpreter, in a temporary
directory), so the README cannot drift from the library. The snippets run with the slow tests
(``python -m pytest -m slow``, which ``.ci/run`` runs after the test command): a fresh interpreter
costs 2-3 s of JAX's import before a snippet starts, half of their time."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path):
    code = SNIPPETS[index]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ,
                                                       "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"README snippet {index}:\n{code}\n{proc.stderr[-3000:]}"


def _bullets(text: str, start: str, end: str | None, indent: str) -> list[str]:
    block = text[text.index(start):text.index(end) if end else None]
    return [line for line in block.splitlines() if line.startswith(indent)]


def test_the_readme_lists_the_adapters_documented_differences_and_no_others():
    """The differences by design live in the adapters' module docstrings (the docs site reads
    them there); the README's list has the same entries, one for one."""
    import jaxbn.equinox
    import jaxbn.flax.nnx

    readme = (ROOT / "README.md").read_text()
    flax_readme = _bullets(readme, "- Flax (NNX and Linen):", "- Equinox:", "  - ")
    equinox_readme = _bullets(readme, "- Equinox:", "## Performance", "  - ")
    for module, listed in ((jaxbn.flax.nnx, flax_readme), (jaxbn.equinox, equinox_readme)):
        documented = _bullets(module.__doc__, "Differences from", None, "  * ")
        assert len(documented) == len(listed) >= 4, (module.__name__, documented, listed)
