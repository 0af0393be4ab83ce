"""What napoleon needs that jaxbn's Google-style docstrings leave implicit, supplied at build time.

The docstrings are written for people and ``help()``; a few habits in them trip napoleon, and the
docs render them as they are instead of asking every docstring to change:

- an ``Args`` entry naming several parameters whose name list wraps onto the next line
  (``x, gamma, beta, ...,`` / ``    renorm: as in ...``): the lines are joined;
- a continuation line of an ``Args`` or ``Raises`` entry indented like an entry rather than
  deeper: it is indented under its entry;
- ``*primals`` and ``**options`` in ``Args`` names: the asterisks are escaped (reST would read
  them as emphasis).

:func:`prepare` runs on ``autodoc-process-docstring`` before napoleon converts the sections.
"""

from __future__ import annotations

import re

_SECTIONS = ("Args", "Arguments", "Raises")
_HEADER = re.compile(r"^(\s*)([A-Z][A-Za-z ]*):\s*$")
_ARG_ENTRY = re.compile(r"^[\w*]+(\s*,\s*[\w*]+)*\s*(\([^)]*\))?\s*:(\s|$)")
_RAISES_ENTRY = re.compile(r"^[\w.]+(\s*(,|/|or)\s*[\w.]+)*\s*:(\s|$)")


def _section_spans(lines: list[str]):
    """``(name, start, end, indent)`` of each Args/Raises section's body lines."""
    spans, i = [], 0
    while i < len(lines):
        header = _HEADER.match(lines[i])
        if header and header.group(2) in _SECTIONS:
            base = len(header.group(1))
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or
                                        len(lines[end]) - len(lines[end].lstrip()) > base):
                end += 1
            body = [ln for ln in lines[i + 1:end] if ln.strip()]
            if body:
                indent = min(len(ln) - len(ln.lstrip()) for ln in body)
                spans.append((header.group(2), i + 1, end, indent))
            i = end
        else:
            i += 1
    return spans


def _fix_section(name: str, body: list[str], indent: int) -> list[str]:
    entry = _RAISES_ENTRY if name == "Raises" else _ARG_ENTRY
    out: list[str] = []
    for line in body:
        text = line[indent:]
        at_entry = line.strip() and len(line) - len(line.lstrip()) == indent
        if (line.strip() and out and out[-1].rstrip().endswith(",") and ":" not in out[-1]
                and len(out[-1]) - len(out[-1].lstrip()) == indent):
            out[-1] = out[-1].rstrip() + " " + line.strip()  # a wrapped list of names
            continue
        if at_entry and out and not entry.match(text):
            out.append(" " * (indent + 2) + text)  # a continuation written at entry depth
            continue
        out.append(line)
    if name != "Raises":
        out = [_escape_names(line, indent) for line in out]
    return out


def _escape_names(line: str, indent: int) -> str:
    if len(line) - len(line.lstrip()) != indent or ":" not in line:
        return line
    names, colon, rest = line.partition(":")
    return re.sub(r"(?<!\\)\*", r"\\*", names) + colon + rest


def prepare(lines: list[str]) -> None:
    """Rewrites a docstring's lines in place (autodoc's ``lines`` list)."""
    for name, start, end, indent in reversed(_section_spans(lines)):
        lines[start:end] = _fix_section(name, lines[start:end], indent)
