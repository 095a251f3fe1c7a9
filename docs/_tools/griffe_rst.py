"""A Griffe extension: the reST roles of jbackprop's docstrings as Markdown cross-references.

The docstrings name other objects the Sphinx way (``:func:`jbackprop.grad```,
``:class:`~jbackprop.Model```, ``:meth:`masked_sum```). mkdocstrings renders Markdown,
where those roles would show as literal text, so this extension rewrites each role, once
the package is loaded, into an autorefs link ``[`grad`][jbackprop.grad]`` when its target
is an object the API reference documents, and into plain code otherwise (so that
``mkdocs build --strict`` never meets a reference it cannot resolve). A paragraph ending
in reST's ``::`` loses one colon: the indented block after it is already Markdown code.
An ``Args:`` entry naming several parameters at once (``X, Y: the inputs and labels``)
becomes one entry per parameter with the same description, as Google style expects.

Targets are looked up as written, then relative to the docstring's class and module, then
under ``jbackprop``. "Documented" mirrors the API pages: the names in each public module's
``__all__``, the public members of those classes, and the top-level ``jbackprop.<name>``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`(~?)([\w.]+)(?:\(\))?`")
LITERAL = re.compile(r"::$", re.M)
SECTION = re.compile(r"^(\s*)(?:Args|Arguments|Parameters|Params|Attributes):\s*$")
SEVERAL = re.compile(r"^(\s+)(\*{0,2}\w+(?:,\s*\*{0,2}\w+)+):(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_several(text: str) -> str:
    """``a, b: text`` items of argument sections as one ``a: text``, ``b: text`` each."""
    lines, out, i = text.splitlines(), [], 0
    section = None  # indentation of the current section's header
    while i < len(lines):
        line = lines[i]
        header = SECTION.match(line)
        if header:
            section = len(header.group(1))
        elif line.strip() and section is not None and _indent(line) <= section:
            section = None
        several = SEVERAL.match(line) if section is not None else None
        if several is None:
            out.append(line)
            i += 1
            continue
        indent, names, first = several.groups()
        body, i = [], i + 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            i -= 1
            body.pop()
        for name in names.split(","):
            out.append(f"{indent}{name.strip()}:{first}")
            out.extend(body)
    return "\n".join(out)


def _exports(module: griffe.Module) -> list[str]:
    return [str(name) for name in (module.exports or ())]


class RstRoles(griffe.Extension):
    """Rewrite ``:role:`target``` into ``[`name`][path]`` for documented targets."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        documented = self._documented(pkg)
        for obj in self._walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = self._rewrite(obj, obj.docstring.value, documented)

    # Griffe 1 names the same event differently.
    on_package_loaded = on_package

    @staticmethod
    def _walk(obj: griffe.Object):
        yield obj
        for member in obj.members.values():
            if not member.is_alias:
                yield from RstRoles._walk(member)

    @staticmethod
    def _documented(pkg: griffe.Module) -> set[str]:
        paths = {pkg.path}
        for name in _exports(pkg):
            paths.add(f"{pkg.path}.{name}")
        for module in pkg.modules.values():
            if module.name.startswith("_") or module.name == "experiments":
                continue
            paths.add(module.path)
            for name in _exports(module):
                paths.add(f"{module.path}.{name}")
                member = module.members.get(name)
                target = member.final_target if member is not None and member.is_alias else member
                if target is not None and target.is_class:
                    for sub in target.members:
                        if not sub.startswith("_"):
                            paths.add(f"{module.path}.{name}.{sub}")
                            paths.add(f"{target.path}.{sub}")
                if target is not None:
                    paths.add(target.path)
        return paths

    @staticmethod
    def _rewrite(obj: griffe.Object, text: str, documented: set[str]) -> str:
        module = obj if obj.is_module else obj.module
        cls = obj if obj.is_class else (obj.parent if obj.parent and obj.parent.is_class else None)

        def replace(match: re.Match) -> str:
            short, name = match.group(1) == "~", match.group(2)
            text = name.rsplit(".", 1)[-1] if short else name
            candidates = [name, f"{module.path}.{name}", f"jbackprop.{name}"]
            if cls is not None:
                candidates.insert(0, f"{cls.path}.{name}")
            for path in candidates:
                if path in documented:
                    return f"[`{text}`][{path}]"
            return f"`{text}`"

        return split_several(LITERAL.sub(":", ROLE.sub(replace, text)))
