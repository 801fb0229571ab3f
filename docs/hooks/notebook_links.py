"""MkDocs hook: links from a notebook to a docs page work both in Jupyter and on the site.

A notebook in notebooks/ links to the math as ``[...](../docs/math.md#layer-normalisation)``:
the path that resolves where the notebook is read as a file (Jupyter, GitHub). mkdocs-jupyter
renders the notebook's Markdown with nbconvert, which leaves links as written, so on the site
that path would point nowhere. This hook rewrites every such ``href`` on a notebook page to the
URL of the built page (``../../math/#layer-normalisation``), keeping the anchor.

A link to a docs page that does not exist is reported as a warning, so ``mkdocs build
--strict`` fails on it; tests/test_site.py checks in the browser that each anchor exists.
"""

from __future__ import annotations

import logging
import re

from mkdocs.utils import get_relative_url

log = logging.getLogger("mkdocs.hooks.notebook_links")

# href="../docs/<page>.md" or "../docs/<page>.md#anchor", as nbconvert writes a Markdown link.
DOCS_LINK = re.compile(r'href="\.\./docs/([^"#]+\.md)(#[^"]*)?"')


def on_page_content(html, page, config, files):
    src = page.file.src_uri
    if not (src.startswith("notebooks/") and src.endswith(".ipynb")):
        return html

    def rewrite(match):
        target, anchor = match.group(1), match.group(2) or ""
        file = files.get_file_from_path(target)
        if file is None:
            log.warning("%s links to ../docs/%s, which is not a page of the site", src, target)
            return match.group(0)
        return f'href="{get_relative_url(file.url, page.url)}{anchor}"'

    return DOCS_LINK.sub(rewrite, html)
