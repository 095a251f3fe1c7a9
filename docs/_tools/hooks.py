"""MkDocs hooks of the documentation site.

* ``@code jbackprop.module.name`` on a line of its own is replaced by the source of that
  function, class or module-level assignment (with its decorators and the comment lines
  right above it), numbered with its line numbers in the file and linked to the file's
  source page. Names may be private (``jbackprop.costs._quadratic_delta``) or nested
  (``jbackprop.activations.Activation.backward``). An unknown name fails the build.
* ``source/<module>.md``: one generated page per library module (``source/training/epoch.md``
  for a module of a package), the whole file with numbered, linkable lines; listed in the
  navigation under "Source".
* ``experiments/runs/<run>/*.png``: the figures of ``experiments/runs/`` served beside the
  included ``experiments/README.md``, so that its relative links and images work; a line
  ``@run-figures`` becomes all of them, one image per figure, captioned with its run.
* ``assets/benchmarks.png``: the home page's plot, drawn here from
  ``docs/data/benchmarks.json`` with matplotlib on every build.
"""

from __future__ import annotations

import ast
import io
import json
import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "jbackprop"
DIRECTIVE = re.compile(r"^@code[ \t]+([\w.]+)[ \t]*$", re.M)
GALLERY = re.compile(r"^@run-figures[ \t]*$", re.M)
RUNS = ROOT / "experiments" / "runs"


# --- source of one object ---------------------------------------------------------------


def module_file(dotted: str) -> tuple[Path, list[str]]:
    """The file of the longest module prefix of ``dotted`` and the remaining name parts."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file() and candidate.resolve().is_relative_to(PACKAGE):
                return candidate, parts[cut:]
    raise PluginError(f"@code {dotted}: no module of jbackprop holds it")


def _defined_name(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def find(dotted: str) -> tuple[Path, int, int, tuple[int, int] | None]:
    """``(file, first line, last line, docstring lines)`` of the definition ``dotted`` names
    (1-based; the docstring's ``(first, last)`` or None where it has none)."""
    path, names = module_file(dotted)
    if not names:
        raise PluginError(f"@code {dotted}: name a function, class or assignment, not a module")
    body = ast.parse(path.read_text(encoding="utf-8")).body
    node = None
    for name in names:
        node = next((n for n in body if name in _defined_name(n)), None)
        if node is None:
            raise PluginError(f"@code {dotted}: {name!r} is not defined in {path.name}")
        body = getattr(node, "body", [])
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    lines = path.read_text(encoding="utf-8").splitlines()
    while first > 1 and lines[first - 2].lstrip().startswith("#"):
        first -= 1  # the comment right above belongs to the definition
    doc = None
    body = getattr(node, "body", [])
    if (
        isinstance(node, ast.FunctionDef | ast.ClassDef)
        and len(body) > 1
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        doc = (body[0].lineno, body[0].end_lineno)
    return path, first, node.end_lineno, doc


def source_page(path: Path) -> str:
    """``source/<module>.md`` for a file of the package."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    name = "jbackprop" if rel.name == "__init__" and rel.parent == Path() else rel.as_posix()
    return f"source/{name.replace('/__init__', '')}.md"


def code_block(dotted: str, page_uri: str) -> str:
    """The definition as Markdown: a line naming it and linking to its lines in the
    source page, then its code with the file's line numbers. A docstring is left out (the
    page around it says the same in mathematics): the code before it and the code after it
    are two blocks, numbered as in the file."""
    path, first, last, doc = find(dotted)
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = path.relative_to(ROOT).as_posix()
    target = posixpath.relpath(source_page(path), posixpath.dirname(page_uri) or ".")
    where = f"lines {first}-{last}" if last > first else f"line {first}"
    link = f"[`{rel}`, {where}]({target}#__codelineno-0-{first})"
    if doc is None:
        parts = [(first, last)]
    else:
        parts = [(first, doc[0] - 1), (doc[1] + 1, last)]
        link += " (docstring left out)"
    out = [f"`{dotted}` · {link}\n{{: .code-origin }}\n"]
    for start, end in parts:
        code = "\n".join(lines[start - 1 : end])
        out.append(f'```python linenums="{start}"\n{code}\n```\n')
    return "\n".join(out)


# --- hooks ------------------------------------------------------------------------------


def modules() -> list[Path]:
    """The library's files: its modules and those of its packages, not the experiments."""
    files = PACKAGE.rglob("*.py")
    return sorted(p for p in files if "experiments" not in p.relative_to(PACKAGE).parts)


def on_config(config, **kwargs):
    pages = [{source_page(p)[len("source/") : -len(".md")]: source_page(p)} for p in modules()]
    config["nav"].append({"Source": pages})
    return config


def run_figures() -> list[Path]:
    return sorted(RUNS.glob("*/*.png"))


def gallery(page_uri: str) -> str:
    """Every figure of ``experiments/runs/``, captioned with its run and file name."""
    out = []
    for png in run_figures():
        uri = "experiments/" + png.relative_to(RUNS.parent).as_posix()
        rel = posixpath.relpath(uri, posixpath.dirname(page_uri) or ".")
        caption = f"`{png.parent.name}/{png.name}`"
        out.append(
            f"<figure markdown>\n![{png.parent.name}]({rel})\n<figcaption markdown>{caption}"
            "</figcaption>\n</figure>\n"
        )
    return "\n".join(out)


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    markdown = GALLERY.sub(lambda m: gallery(page.file.src_uri), markdown)
    return DIRECTIVE.sub(lambda m: code_block(m.group(1), page.file.src_uri), markdown)


def on_files(files: Files, config, **kwargs) -> Files:
    for path in modules():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        content = (
            f"# `{rel}`\n\nThe whole module, as the lecture page and the API reference quote "
            f'it.\n\n```python linenums="1"\n{text}```\n'
        )
        files.append(File.generated(config, source_page(path), content=content))
    for png in run_figures():
        uri = "experiments/" + png.relative_to(RUNS.parent).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    files.append(File.generated(config, "assets/benchmarks.png", content=benchmark_plot()))
    return files


# --- the home page's plot ---------------------------------------------------------------


def benchmark_plot() -> bytes:
    """A horizontal bar chart of the speed-ups in ``docs/data/benchmarks.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((ROOT / "docs" / "data" / "benchmarks.json").read_text(encoding="utf-8"))
    rows = data["speedups"]
    labels = [r["label"] for r in rows]
    values = [r["speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.4), dpi=110)
    colors = ["#3f51b5" if v >= 1.0 else "#9e9e9e" for v in values]
    bars = ax.barh(range(len(rows)), values, color=colors)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    for bar, v in zip(bars, values, strict=True):
        ax.text(v * 1.06, bar.get_y() + bar.get_height() / 2, f"{v:g}×", va="center", fontsize=9)
    ax.set_xlim(0.5, max(values) * 3)
    ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t < max(values) * 3]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("speed-up of jbackprop (times faster; log scale)")
    ax.set_title(data["title"], fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
