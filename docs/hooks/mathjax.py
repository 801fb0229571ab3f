"""MkDocs hook: ship MathJax with the site, so every page typesets its math with no network.

MathJax 3 comes from a Python package, ``django-static-mathjax`` (in the ``dev`` extra; despite
its name it is only MathJax's own files, with no dependency on Django). This hook, named under
``hooks:`` in mkdocs.yml,

1. adds the parts of MathJax's ``es5/`` folder that the page loader ``tex-mml-chtml.js`` uses
   (that file, the TeX extensions it may load on demand, the CommonHTML fonts, the menu and the
   accessibility modules) to the site as ``assets/mathjax/...``; mkdocs.yml loads
   ``assets/mathjax/tex-mml-chtml.js`` after ``javascripts/mathjax.js`` (the configuration);
2. removes from each notebook page the MathJax 2 loader and configuration that mkdocs-jupyter's
   template writes (``<script src="">`` and a ``text/x-mathjax-config`` block): the MathJax 3
   loaded on every page typesets the notebooks too (see docs/javascripts/mathjax.js).

Nothing is copied into the repository; the files travel from the installed package to the site at
build time (and under ``mkdocs serve``).
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, InclusionLevel

SITE_FOLDER = "assets/mathjax"
# What tex-mml-chtml.js loads from its own folder: TeX extensions (\require, autoload), the
# CommonHTML fonts, the context menu, and the accessibility modules the menu can switch on.
PARTS = ["tex-mml-chtml.js", "input/tex/extensions", "output/chtml", "ui", "a11y", "sre"]


def mathjax_es5_dir() -> Path:
    """The ``es5`` folder of the installed MathJax package; PluginError naming the fix if absent."""
    try:
        import mathjax  # the package django-static-mathjax installs
    except ImportError as err:
        raise PluginError(
            "docs/hooks/mathjax.py: MathJax is not installed; expected the Python package "
            "'django-static-mathjax' (pip install -e \".[dev]\" installs it)"
        ) from err
    es5 = Path(mathjax.__file__).resolve().parent / "static" / "mathjax" / "es5"
    if not (es5 / "tex-mml-chtml.js").is_file():
        raise PluginError(
            f"docs/hooks/mathjax.py: expected MathJax's tex-mml-chtml.js in {es5}, "
            "found no such file (is 'mathjax' another package than django-static-mathjax?)"
        )
    return es5


def _asset_paths(es5: Path) -> list[Path]:
    paths: list[Path] = []
    for part in PARTS:
        path = es5 / part
        if path.is_file():
            paths.append(path)
        elif path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.is_file()))
    return paths


def on_files(files, config):
    es5 = mathjax_es5_dir()
    for path in _asset_paths(es5):
        uri = f"{SITE_FOLDER}/{path.relative_to(es5).as_posix()}"
        files.append(
            File.generated(
                config, uri, abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV
            )
        )
    return files


# mkdocs-jupyter's template (nbconvert's "lab" template) loads MathJax 2 from
# `custom_mathjax_url` (empty in mkdocs.yml, so `<script src="">`) and configures it in a
# text/x-mathjax-config block. Both are dead weight next to MathJax 3; drop them.
_NOTEBOOK_MATHJAX2 = re.compile(
    r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.DOTALL
)


def on_post_page(output, page, config):
    if page.file.src_uri.endswith(".ipynb"):
        output = _NOTEBOOK_MATHJAX2.sub("", output, count=1)
    return output
