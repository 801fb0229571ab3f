"""MkDocs hook: render the notebooks of the top-level notebooks/ folder as pages of the site.

The notebooks live outside docs/ (next to the code, where pytest --nbmake runs them), so MkDocs
would not find them. This hook, named under ``hooks:`` in mkdocs.yml,

1. adds every ``notebooks/*.ipynb`` to the site's files as ``notebooks/<name>.ipynb``, before
   mkdocs-jupyter's own ``on_files`` turns .ipynb files into pages;
2. appends a "Notebooks" section to the nav listing them in file-name order, each titled by the
   first ``# heading`` of its first Markdown cell;
3. replaces the line ``<!-- notebooks -->`` in any page with a list of links to them.

So a new notebook appears in the docs with no edit to mkdocs.yml, a missing one is simply not
listed (``mkdocs build --strict`` stays clean), and nothing is generated or copied by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, InclusionLevel

NAV_TITLE = "Notebooks"
MARKER = "<!-- notebooks -->"


def _notebooks_dir(config) -> Path:
    return Path(config.config_file_path).resolve().parent / "notebooks"


def _notebooks(config) -> list[Path]:
    return sorted(_notebooks_dir(config).glob("*.ipynb"))


def _title(path: Path) -> str:
    """The text of the notebook's first "# " heading, or its file name without the extension."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError, TypeError):
        return path.stem
    for cell in cells:
        if cell.get("cell_type") != "markdown":
            continue
        source = cell.get("source", "")
        text = "".join(source) if isinstance(source, list) else source
        for line in text.splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return path.stem


def on_config(config):
    notebooks = _notebooks(config)
    if notebooks and config.nav is not None:
        # `mkdocs serve` may hand the same config back; add the section once.
        config.nav = [
            item for item in config.nav if not (isinstance(item, dict) and NAV_TITLE in item)
        ]
        config.nav.append({NAV_TITLE: [{_title(p): f"notebooks/{p.name}"} for p in notebooks]})
    return config


@event_priority(100)  # before mkdocs-jupyter (priority 0) wraps the .ipynb files as pages
def on_files(files, config):
    root = str(_notebooks_dir(config).parent)
    for path in _notebooks(config):
        files.append(
            File(
                f"notebooks/{path.name}",
                src_dir=root,
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
                inclusion=InclusionLevel.INCLUDED,
            )
        )
    return files


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    notebooks = _notebooks(config)
    if not notebooks:
        return markdown.replace(MARKER, "(No notebooks yet.)")
    # Links relative to the page's own source file, as MkDocs resolves them.
    depth = page.file.src_uri.count("/")
    prefix = "../" * depth + "notebooks/"
    items = "\n".join(f"- [{_title(p)}]({prefix}{p.name})" for p in notebooks)
    return markdown.replace(MARKER, items)


def on_serve(server, config, builder):
    # `mkdocs serve` watches docs/ only; rebuild when a notebook changes too.
    if _notebooks_dir(config).is_dir():
        server.watch(str(_notebooks_dir(config)))
    return server
