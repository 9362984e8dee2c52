"""MkDocs hook: the knob table of a method page, generated from the method class.

A page writes ``<!-- knobs: PGD -->`` and gets a table of the class's dataclass
fields: the class's field name, the keyword ``advgraph.wrap(method=..., ...)`` takes
for it, the default (read from the dataclass), and the description (the ``Fields:``
section of the docstrings along the class's MRO). It also prints the class
attributes an adapter reads (``modes``, ``closure``, ``site``) and the number of
passes a step runs with the defaults (``Method.passes()``). Nothing is typed twice:
a new field or a changed default shows up on the next build.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

_MARKER = re.compile(r"<!--\s*knobs:\s*(\w+)\s*-->")


def _field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from every ``Fields:`` section along the MRO."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.getdoc(klass) if "__doc__" in vars(klass) else None
        if not doc or "Fields:" not in doc:
            continue
        section = doc.split("Fields:", 1)[1]
        current = None
        for line in section.splitlines()[1:]:
            if not line.strip():
                if current:
                    break
                continue
            if not line.startswith(" "):
                break
            match = re.match(r"^ {4}(\w+):\s*(.*)$", line)
            if match:
                current = match.group(1)
                docs[current] = match.group(2).strip()
            elif current:
                docs[current] += " " + line.strip()
    return docs


def knob_table(name: str) -> str:
    import advgraph.methods as methods
    from advgraph.methods import _names

    cls = getattr(methods, name)
    aliases = {field: key for key, field in _names._ALIASES.get(cls.name, {}).items()}
    docs = _field_docs(cls)
    default = cls()
    rows = [
        "| field | `wrap()` keyword | default | meaning |",
        "|---|---|---|---|",
    ]
    for field in dataclasses.fields(cls):
        value = getattr(default, field.name)
        shown = f"`{value:.4g}`" if isinstance(value, float) else f"`{value!r}`"
        text = docs.get(field.name, "").replace("``", "`").replace("|", "\\|")
        rows.append(f"| `{field.name}` | `{aliases.get(field.name, field.name)}` | {shown} | {text} |")
    facts = (
        f"`advgraph.methods.{name}`, `method={cls.name!r}`: runs in mode "
        + " / ".join(f"`{m}`" for m in cls.modes)
        + f"; the closure returns `{cls.closure}`; perturbs the {cls.site}; "
        + f"**{default.passes()} pass(es) per step** with these defaults."
    )
    return "\n".join(rows) + "\n\n" + facts + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' signature)
    return _MARKER.sub(lambda m: knob_table(m.group(1)), markdown)
