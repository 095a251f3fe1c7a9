"""Run the Python blocks of the site's pages, as the test suite does, and refresh figures.

Every fenced ``python`` block of a page runs in order, in one namespace per page, in a
fresh temporary working directory. A page shows the figures its blocks draw: images under
``figures/`` that the page links to must be written by the blocks themselves.

    .venv/bin/python docs/_tools/tutorials.py              # run every page, copy its figures
    .venv/bin/python docs/_tools/tutorials.py mnist scale  # only these tutorials

Copying puts each page's figures next to it (``docs/tutorials/figures/``), where the built
site finds them. ``tests/test_docs_site.py`` runs the same blocks and checks the figures
are drawn, without copying.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
FIGURE = re.compile(r"!\[[^\]]*\]\((figures/[\w.-]+\.png)\)")


# The tutorials in the order of the site (and of their numbers).
TUTORIALS = ("index", "mnist", "gradient-check", "per-example", "privacy", "attribution", "scale")


def pages() -> list[Path]:
    """The pages whose code runs: the home page and every tutorial, in site order."""
    return [DOCS / "index.md", *(DOCS / "tutorials" / f"{name}.md" for name in TUTORIALS)]


def blocks(page: Path) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced python block of ``page``, in order."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


def figures(page: Path) -> list[str]:
    """The ``figures/*.png`` paths the page shows, relative to the page."""
    return sorted(set(FIGURE.findall(page.read_text(encoding="utf-8"))))


@contextlib.contextmanager
def working_directory(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run(page: Path, workdir: Path) -> dict:
    """Execute the page's blocks in ``workdir``; return the namespace they share."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__main__"}
    with working_directory(workdir):
        for line, code in blocks(page):
            exec(compile(code, f"{page.relative_to(DOCS.parent)}:{line}", "exec"), namespace)
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        pass
    else:
        plt.close("all")
    return namespace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="page names without .md (default: all)")
    parser.add_argument("--no-copy", action="store_true", help="run only, keep no figures")
    args = parser.parse_args(argv)
    chosen = [p for p in pages() if not args.names or p.stem in args.names]
    if args.names and not chosen:
        parser.error(f"no page named {args.names}; the pages are {[p.stem for p in pages()]}")
    for page in chosen:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run(page, Path(tmp))
            for rel in figures(page):
                drawn = Path(tmp) / rel
                if not drawn.is_file():
                    print(f"{page.name}: the blocks did not draw {rel}", file=sys.stderr)
                    return 1
                if not args.no_copy:
                    (page.parent / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(drawn, page.parent / rel)
        print(f"{page.relative_to(DOCS)}: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
