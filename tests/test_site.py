"""The documentation site, read in a real browser.

Builds the site as CI does (`mkdocs build --strict` into a temporary folder), serves it on
127.0.0.1, opens every page in headless Chromium at 1280 x 900 with every request to another
host refused (the site must work offline), and fails on what a reader would see as broken:

- raw TeX left in the text (`$$`, `\\frac`, `\\[`, `\\(`, or `$...\\command...$`), i.e. math
  that MathJax did not typeset, a formula MathJax could not parse, or MathJax not finishing;
- an image that does not load;
- a JavaScript error (an uncaught exception or a console error, a failed request included);
- a request to another host (a CDN, web fonts);
- content wider than the 1280-px window, or a display equation wider than its column;
- a link to an anchor of a page of the site (a notebook's "The math: ..." link to a section of
  docs/math.md, math.md's links back to the notebooks' sections) whose target has no such id.

The browser tests are skipped when Chromium (Debian's `chromium` package: /usr/bin/chromium) or
the Python package playwright (in the dev extra; it drives the system's Chromium, no browser
download) is missing; set TINYLM_CHROMIUM to use another Chromium binary. The last tests need
no browser: they check the pieces that keep the site offline (MathJax from its package, the
notebook pages' MathJax 2 loader removed, no other host in mkdocs.yml).
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1280, 900
TYPESET_TIMEOUT_MS = 30_000


def _chromium() -> str | None:
    for name in (os.environ.get("TINYLM_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


pytestmark = pytest.mark.skipif(not (ROOT / "mkdocs.yml").is_file(), reason="no mkdocs.yml")


@pytest.fixture(scope="module")
def browser_tools():
    """The Chromium binary and playwright's sync API, or a skip naming what is missing."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium (apt-get install chromium)")
    pytest.importorskip("mkdocs")
    return chromium, pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def site(browser_tools, tmp_path_factory) -> Path:
    # Asks for browser_tools first: no point in a build that no browser will read.
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return site_dir


@pytest.fixture(scope="module")
def server(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(site))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _page_paths(site: Path) -> list[str]:
    """Every page's URL path ('' for the home page), from the built site's index.html files."""
    return sorted(
        "" if p.parent == site else p.parent.relative_to(site).as_posix() + "/"
        for p in site.rglob("index.html")
        if "assets" not in p.relative_to(site).parts
    )


# Run in the page once MathJax says it is done (html[data-math="typeset"]). Returns what a
# reader would see as broken, as lists of short descriptions.
INSPECT_JS = r"""
async () => {
  const out = {rawTex: [], badImages: [], tooWide: [], formulas: 0, links: [], ids: []};
  // Visible text outside code, scripts and typeset math.
  const skip = "pre, code, script, style, textarea, mjx-container, .md-search, .md-source";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const patterns = [/\$\$/, /\\frac/, /\\\[/, /\\\(/, /\$[^$\n]*\\[A-Za-z]+[^$\n]*\$/];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!el || el.closest(skip) || !el.checkVisibility()) continue;
    const text = node.textContent;
    for (const p of patterns) {
      const m = text.match(p);
      if (m) {
        const i = Math.max(0, m.index - 30);
        out.rawTex.push(text.slice(i, m.index + 50).replace(/\s+/g, " ").trim());
        break;
      }
    }
  }
  // Formulas MathJax could not parse (an unknown macro, a missing brace) are drawn as red
  // text inside <mjx-merror> rather than raising: count them as raw TeX too.
  for (const err of document.querySelectorAll("mjx-merror")) {
    const tex = err.getAttribute("data-mjx-error") || err.textContent;
    out.rawTex.push(`TeX error: ${tex.slice(0, 80)}`);
  }
  // Images: load the lazy ones too, then ask each whether it decoded.
  for (const img of document.images) {
    img.loading = "eager";
    try { await img.decode(); } catch (e) { /* counted below */ }
    if (!img.complete || img.naturalWidth === 0) out.badImages.push(img.src.slice(0, 120));
  }
  // Widths: the page, then each display equation against its column.
  const page = document.documentElement.scrollWidth;
  if (page > window.innerWidth) out.tooWide.push(`page is ${page} px wide`);
  out.formulas = document.querySelectorAll("mjx-container").length;
  for (const box of document.querySelectorAll("mjx-container[display='true']")) {
    const math = box.querySelector("mjx-math");
    const column = box.closest("div.arithmatex") || box.parentElement;
    const need = math.getBoundingClientRect().width;
    const right = math.getBoundingClientRect().right;
    if (need > column.clientWidth + 1 || right > window.innerWidth) {
      const label = (box.nextElementSibling || box).textContent || "";
      out.tooWide.push(
        `equation ${Math.round(need)} px wide (already set smaller) in a ` +
        `${column.clientWidth}-px column; split it into lines (\\begin{aligned} ... \\\\ ...): ` +
        label.replace(/\s+/g, " ").slice(0, 80));
    }
  }
  // Links to an anchor on this site (outside the navigation), and every id of this page.
  for (const a of document.querySelectorAll("a[href*='#']")) {
    const url = new URL(a.href, location.href);
    if (url.origin !== location.origin || url.hash.length < 2) continue;
    if (a.closest(".md-header, .md-sidebar, .md-footer, .md-search")) continue;
    const text = (a.textContent || "").replace(/\s+/g, " ").trim().slice(0, 60);
    out.links.push([url.pathname, decodeURIComponent(url.hash.slice(1)), text]);
  }
  out.ids = Array.from(document.querySelectorAll("[id]"), (e) => e.id);
  return out;
}
"""


@pytest.fixture(scope="module")
def reports(browser_tools, site, server):
    """For every page of the site, read in one browser session: its problems, its number of
    typeset formulas, its links to anchors on the site, and its ids."""
    chromium, playwright = browser_tools
    problems: dict[str, list[str]] = {}
    equations: dict[str, int] = {}
    links: dict[str, list[tuple[str, str, str]]] = {}
    ids: dict[str, set[str]] = {}
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
            current: list[str] = []

            def refuse_other_hosts(route):
                if route.request.url.startswith(server):
                    route.continue_()
                else:
                    current.append(f"request to another host: {route.request.url[:120]}")
                    route.abort()

            context.route("**/*", refuse_other_hosts)
            page = context.new_page()
            page.on("pageerror", lambda err: current.append(f"JavaScript error: {err}"))
            page.on(
                "console",
                lambda msg: msg.type == "error" and current.append(f"console error: {msg.text}"),
            )
            # A request the next navigation cancels (the favicon of the page just left, on a
            # loaded machine) fails as net::ERR_ABORTED: that is the browser moving on, not a
            # broken file. A missing file answers 404, which the image check reports.
            page.on(
                "requestfailed",
                lambda req: req.url.startswith(server)
                and "ERR_ABORTED" not in (req.failure or "")
                and current.append(f"failed to load {req.url[len(server):]} ({req.failure})"),
            )
            for path in _page_paths(site):
                current.clear()
                page.goto(f"{server}/{path}", wait_until="load")
                try:
                    page.wait_for_selector(
                        "html[data-math='typeset']", state="attached", timeout=TYPESET_TIMEOUT_MS
                    )
                except playwright.TimeoutError:
                    state = page.evaluate("document.documentElement.dataset.math")
                    current.append(f"MathJax did not finish (html[data-math] is {state!r})")
                found = page.evaluate(INSPECT_JS)
                current.extend(f"raw TeX in the text: {s!r}" for s in found["rawTex"])
                current.extend(f"image does not load: {s}" for s in found["badImages"])
                current.extend(f"too wide: {s}" for s in found["tooWide"])
                problems[path or "/"] = list(current)
                equations[path or "/"] = found["formulas"]
                links[path or "/"] = [tuple(link) for link in found["links"]]
                ids[path or "/"] = set(found["ids"])
        finally:
            browser.close()
    return problems, equations, links, ids


def test_every_page_reads_cleanly_offline(reports):
    problems = reports[0]
    assert len(problems) >= 6, f"expected the site's pages, found {sorted(problems)}"
    bad = {path: p for path, p in problems.items() if p}
    lines = [f"{path}: {p}" for path, items in sorted(bad.items()) for p in items]
    assert not bad, f"{len(lines)} problem(s) on {len(bad)} page(s):\n" + "\n".join(lines)


def test_math_is_typeset_on_markdown_and_notebook_pages(reports):
    # The check above finds TeX left raw; this one makes sure there was math to typeset at all
    # (an empty page would pass it), on a Markdown page and on every notebook page.
    equations = reports[1]
    assert equations.get("math/", 0) >= 20, equations
    notebook_pages = [p for p in equations if p.startswith("notebooks/")]
    assert notebook_pages, sorted(equations)
    missing = [p for p in notebook_pages if equations[p] == 0]
    # Every notebook so far has math; one without any would be named here.
    assert not missing, f"no formula typeset on {missing}"


def test_links_to_anchors_land_on_an_id_of_their_page(reports):
    # A notebook links to its section of docs/math.md as ../docs/math.md#anchor (right in
    # Jupyter; docs/hooks/notebook_links.py rewrites it for the site), and math.md links back to
    # the notebooks' sections. A renamed heading would leave such a link pointing at nothing,
    # which neither MkDocs nor the browser reports.
    _, _, links, ids = reports
    broken = []
    for page, page_links in sorted(links.items()):
        for target_path, anchor, text in page_links:
            target = target_path.lstrip("/") or "/"
            if target not in ids:
                broken.append(f"{page}: {text!r} -> /{target_path.lstrip('/')} is not a page")
            elif anchor not in ids[target]:
                broken.append(f"{page}: {text!r} -> {target}#{anchor}: no such id there")
    assert not broken, f"{len(broken)} broken anchor link(s):\n" + "\n".join(broken)
    # The links this test exists for are there: notebook -> math.md and math.md -> notebook.
    to_math = [p for p, ls in links.items() if p.startswith("notebooks/")
               and any(t.strip("/") == "math" for t, _, _ in ls)]
    back = [t for t, _, _ in links.get("math/", []) if t.strip("/").startswith("notebooks/")]
    assert len(to_math) >= 8, f"notebook pages linking to math.md: {sorted(to_math)}"
    assert len(back) >= 10, f"links from math.md to the notebooks: {back}"


# ----------------------------------------------------------------------------------------------
# Without a browser: the pieces that keep the site offline.


def _hook():
    """docs/hooks/mathjax.py as a module (MkDocs loads it by path, as here)."""
    import importlib.util

    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("mathjax_hook", ROOT / "docs/hooks/mathjax.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mathjax_comes_from_its_package_with_fonts_and_extensions():
    pytest.importorskip("mathjax", reason="django-static-mathjax (dev extra) is not installed")
    hook = _hook()
    es5 = hook.mathjax_es5_dir()
    names = {p.relative_to(es5).as_posix() for p in hook._asset_paths(es5)}
    assert "tex-mml-chtml.js" in names
    assert "output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff" in names
    assert "input/tex/extensions/boldsymbol.js" in names  # loaded on demand by \boldsymbol
    assert not any(n.startswith("output/svg") for n in names)  # only what the page loader uses


def test_notebook_pages_lose_the_mathjax2_loader_and_others_are_untouched():
    hook = _hook()
    notebook_html = (
        "<head><!-- Load mathjax -->\n<script src=\"\"> </script>\n"
        '<script type="text/x-mathjax-config">MathJax.Hub.Config({})</script>\n'
        "<!-- End of mathjax configuration --><script>keep()</script></head>"
    )

    def page(src_uri):
        return types.SimpleNamespace(file=types.SimpleNamespace(src_uri=src_uri))

    out = hook.on_post_page(notebook_html, page("notebooks/04_layernorm.ipynb"), None)
    assert out == "<head><script>keep()</script></head>"
    assert hook.on_post_page(notebook_html, page("math.md"), None) == notebook_html


def test_the_site_config_names_no_other_host():
    # Every script and stylesheet the site loads is its own; the theme uses the system's fonts.
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    for key in ("extra_javascript", "extra_css"):
        for entry in config.get(key, []):
            path = entry if isinstance(entry, str) else entry["path"]
            assert "//" not in path, f"mkdocs.yml {key} loads {path} from another host"
    assert config["theme"].get("font") is False, "theme.font must be false (no Google Fonts)"
