"""Griffe extension for the documentation build: Google-style spellings griffe does not read.

1. ``Example:`` (singular), which Napoleon accepts but griffe reads as an admonition: its ``>>>``
   lines would be rendered as Markdown prose (and brackets in outputs such as
   ``[torch.Size([4, 16])]`` as cross-references). It is renamed ``Examples:``, so doctests render
   as code blocks.
2. Parameters documented together in an ``Args:`` section, so that the parameter table has one row
   per parameter of the signature, once each, in the signature's order (`normalise_parameters`):
   - ``a, b: description`` (the names possibly wrapped over several lines): one entry per name;
     when the description is a list of as many short items (``a, b: lambda_I, lambda_R.``) each
     name gets its own item, otherwise each gets the whole description;
   - several parameters in one entry (``out_dim: K. n_local_crops: L.``): split at each
     ``. name:`` / ``; name:`` that names another parameter of the signature;
   - a parameter of the signature the section does not describe gets a row (with its type and
     default from the signature) reading "see above".

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
    return normalise_parameters(text, None)


_ITEM = re.compile(r"^(?P<names>\*{0,2}[A-Za-z_]\w*(?:\s*,\s*\*{0,2}[A-Za-z_]\w*)*)\s*(?P<type>\([^)]*\))?\s*:(?P<rest>.*)$")


def _top_level_split(text: str) -> list[str]:
    """``"a, b (c, d), e"`` -> ``["a", "b (c, d)", "e"]``: commas outside brackets and backticks."""
    parts, depth, tick, cur = [], 0, False, ""
    for ch in text:
        if ch == "`":
            tick = not tick
        elif not tick and ch in "([{":
            depth += 1
        elif not tick and ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0 and not tick:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def _split_inline(name: str, body: list[str], params: list[str]) -> list[tuple[str, list[str]]]:
    """``name``'s entry, and those of the other parameters its text names as ``. other: ...``."""
    joined = " ".join(line.strip() for line in body if line.strip())
    others = [p for p in params if p != name]
    if not others:
        return [(name, body)]
    pattern = re.compile(r"(?<=[.;])\s+(" + "|".join(re.escape(p) for p in others) + r"):\s")
    cuts = list(pattern.finditer(joined))
    if not cuts:
        return [(name, body)]
    out, last, current = [], 0, name
    for cut in cuts:
        out.append((current, [joined[last : cut.start()].strip()]))
        current, last = cut.group(1), cut.end()
    out.append((current, [joined[last:].strip()]))
    return out


def normalise_parameters(text: str, params: list[str] | None) -> str:
    """Rewrite the parameter sections of a docstring to one entry per parameter (see the module).

    Args:
        text: the docstring.
        params: the signature's parameter names in order (``*args`` / ``**kwargs`` with their
            stars); None: only split joint entries (no reordering, nothing added).

    Returns:
        The docstring with its parameter sections rewritten.

    Example:
        >>> print(normalise_parameters("Args:\\n    b, c: lambda_B, lambda_C.\\n    a: one. d: four.\\n",
        ...                            ["a", "b", "c", "d", "e"]))
        Args:
            a: one.
            b: lambda_B.
            c: lambda_C.
            d: four.
            e: see above.
        <BLANKLINE>
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if line.strip().lower() not in _PARAM_SECTIONS:
            continue
        section_indent = _indent(line)
        block: list[str] = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > section_indent):
            block.append(lines[i])
            i += 1
        trailing = []
        while block and not block[-1].strip():  # blank lines after the section stay after it
            trailing.append(block.pop())
        out.extend(_rewrite_section(block, params))
        out.extend(trailing)
    return "\n".join(out)


def _rewrite_section(block: list[str], params: list[str] | None) -> list[str]:
    if not block:
        return block
    item_indent = min(_indent(line) for line in block if line.strip())
    pad = " " * item_indent
    # join a list of names wrapped over several lines: "a, b,\n    c: description"
    joined: list[str] = []
    for line in block:
        if joined and _indent(line) == item_indent and _WRAPPED_NAMES.match(joined[-1]) and \
                _indent(joined[-1]) == item_indent:
            joined[-1] = joined[-1].rstrip() + " " + line.strip()
        else:
            joined.append(line)
    items: list[tuple[str, str, list[str]]] = []  # (names, type, [first line, continuation...])
    for line in joined:
        match = _ITEM.match(line.strip()) if _indent(line) == item_indent and line.strip() else None
        if match is None:
            if not items:
                return block  # not a list of entries: leave it alone
            items[-1][2].append(line)
            continue
        items.append((match["names"], match["type"] or "", [match["rest"]]))
    known = [p.lstrip("*") for p in params] if params is not None else None
    entries: list[tuple[str, str, list[str]]] = []  # one per name
    for names_text, type_, body in items:
        names = [n.strip() for n in names_text.split(",")]
        if len(names) > 1:
            parts = _top_level_split(body[0].strip().rstrip("."))
            if len(body) == 1 and len(parts) == len(names) and all(0 < len(p) <= 40 for p in parts):
                bodies = [[" " + p + "."] for p in parts]
            else:
                bodies = [body] * len(names)
        else:
            bodies = [body]
        for name, one in zip(names, bodies):
            if known is not None:
                for sub_name, sub_body in _split_inline(name.lstrip("*"), one, known):
                    if sub_body is one:
                        entries.append((name, type_, one))
                    elif sub_name == name.lstrip("*"):
                        entries.append((name, type_, [" " + sub_body[0]]))
                    else:
                        entries.append((sub_name, "", [" " + sub_body[0]]))
            else:
                entries.append((name, type_, one))
    if params is not None:
        by_name: dict[str, tuple[str, str, list[str]]] = {}
        for entry in entries:
            by_name.setdefault(entry[0].lstrip("*"), entry)
        ordered = [by_name.get(p.lstrip("*"), (p, "", [" see above."])) for p in params]
        ordered += [e for e in entries if e[0].lstrip("*") not in known and e not in ordered]
        entries = ordered
    result = []
    for name, type_, body in entries:
        result.append(f"{pad}{name}{(' ' + type_) if type_ else ''}:{body[0]}")
        result.extend(body[1:])
    return result


def _signature(obj: Object) -> list[str] | None:
    """The parameter names of a function, or of a class's ``__init__`` (with ``*`` / ``**``), or None."""
    try:
        parameters = obj.parameters  # functions; classes: their __init__
    except Exception:  # noqa: BLE001 - attributes, modules, classes without __init__
        return None
    names = []
    for p in parameters:
        if p.name in ("self", "cls"):
            continue
        kind = str(getattr(p.kind, "value", p.kind))
        names.append(("*" if "var-positional" in kind else "**" if "var-keyword" in kind else "") + p.name)
    return names


class ExampleSections(Extension):
    """Read ``Example:`` as an examples section; one parameter-table row per signature parameter."""

    def on_package(self, *, pkg: Object, **kwargs: Any) -> None:  # every object is loaded by then
        seen: set[int] = set()
        stack = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen or obj.is_alias:
                continue
            seen.add(id(obj))
            self._rewrite(obj)
            stack.extend(m for m in obj.members.values() if not m.is_alias)

    @staticmethod
    def _rewrite(obj: Object) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        value = docstring.value
        if "Example:" in value:
            value = _EXAMPLE_TITLE.sub(r"\g<indent>Examples:", value)
        if obj.is_function or obj.is_class:
            value = normalise_parameters(value, _signature(obj))
        docstring.value = value
