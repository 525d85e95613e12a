"""Griffe extension for the documentation build: two Google-style spellings griffe does not read.

1. ``Example:`` (singular), which Napoleon accepts but griffe reads as an admonition: its ``>>>``
   lines would be rendered as Markdown prose (and brackets in outputs such as
   ``[torch.Size([4, 16])]`` as cross-references). It is renamed ``Examples:``, so doctests render
   as code blocks.
2. Parameters documented together (``mean, std: the normalisation ...``, the list of names possibly
   wrapped over several lines) in an ``Args:`` section: the entry is repeated for each name, so
   griffe still checks every name against the signature and the table shows each parameter with
   its type.

The docstrings are rewritten before griffe parses them; nothing in the package changes.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE_TITLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_PARAM_SECTIONS = ("args:", "arguments:", "params:", "parameters:", "keyword args:", "keyword arguments:")
_WRAPPED_NAMES = re.compile(r"^\s+[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*\s*,\s*$")
_JOINT_ITEM = re.compile(r"^(?P<indent>\s+)(?P<names>[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)\s*:(?P<rest>.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_joint_parameters(text: str) -> str:
    """Repeat ``a, b: description`` entries of parameter sections once per name.

    Example:
        >>> print(split_joint_parameters("Args:\\n    a, b: the pair.\\n        More.\\n"))
        Args:
            a: the pair.
                More.
            b: the pair.
                More.
        <BLANKLINE>
    """
    lines = text.split("\n")
    out: list[str] = []
    section_indent: int | None = None  # indent of the current parameter-section title
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.lower() in _PARAM_SECTIONS:
            section_indent = _indent(line)
            out.append(line)
            i += 1
            continue
        if section_indent is not None and stripped and _indent(line) <= section_indent:
            section_indent = None  # the section ended
        if section_indent is not None and _WRAPPED_NAMES.match(line) and i + 1 < len(lines):
            # a list of names wrapped over several lines: "a, b,\n    c: description"
            lines[i + 1] = line.rstrip() + " " + lines[i + 1].strip()
            i += 1
            continue
        match = _JOINT_ITEM.match(line) if section_indent is not None else None
        if match is None:
            out.append(line)
            i += 1
            continue
        item_indent = _indent(line)
        body = [match["rest"]]
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > item_indent):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():  # blank lines after the item stay after the copies
            body.pop()
            i -= 1
        for name in (n.strip() for n in match["names"].split(",")):
            out.append(f"{match['indent']}{name}:{body[0]}")
            out.extend(body[1:])
    return "\n".join(out)


class ExampleSections(Extension):
    """Read ``Example:`` as an examples section and split joint parameter entries."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        value = docstring.value
        if "Example:" in value:
            value = _EXAMPLE_TITLE.sub(r"\g<indent>Examples:", value)
        if "," in value:
            value = split_joint_parameters(value)
        docstring.value = value
