// MathJax 3 configuration, read before MathJax itself loads. MathJax ships with the site: the
// hook docs/hooks/mathjax.py copies it from its Python package to assets/mathjax/, and
// mkdocs.yml loads assets/mathjax/tex-mml-chtml.js right after this file. No CDN, no network.
//
// Where the math is:
// - Markdown pages: pymdownx.arithmatex (generic mode) wraps it in <span class="arithmatex">
//   \( ... \) </span> or <div class="arithmatex"> \[ ... \] </div>.
// - Notebook pages: mkdocs-jupyter leaves $...$ and $$...$$ as they are in the rendered Markdown
//   cells, <div class="jp-RenderedMarkdown"> holding <p>, <li>, ... elements, and in the
//   headings of the page's table of contents (.md-nav--secondary).
// Only those elements are typeset (MATH_ELEMENTS below), so a dollar sign in a code output, the
// navigation or the search box stays a dollar; inside them, <pre> and <code> are skipped as
// MathJax always does.
//
// Why not ignoreHtmlClass/processHtmlClass: MathJax's test is made per element, and an
// ignoreHtmlClass of ".*|" (the usual recipe) also matches the empty class of the <p> inside a
// notebook cell, so notebook math stayed raw TeX. Choosing the elements to typeset is simpler.
const MATH_ELEMENTS = ".arithmatex, .jp-RenderedMarkdown, .md-nav--secondary .md-nav__link";

window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
    // An unknown macro is an error (a red box saying "Undefined control sequence"), which the
    // browser test finds, rather than its name quietly printed in red inside the formula.
    packages: { "[-]": ["noundefined"] },
  },
  options: {
    ignoreHtmlClass: "tex2jax_ignore|mathjax_ignore",
  },
  startup: {
    typeset: false, // typesetMathElements does it, on this page and after each page change
    ready() {
      MathJax.startup.defaultReady();
      MathJax.startup.promise = MathJax.startup.promise.then(typesetMathElements);
    },
  },
};

// Typesets the math of the current page, once per element (data-math-done marks them): typeset
// again, an element's math would be found a second time in the MathML that MathJax keeps beside
// each formula for screen readers, and drawn twice. html[data-math] tells when it is done (the
// browser test in tests/test_site.py waits for "typeset").
function typesetMathElements() {
  const root = document.documentElement;
  const todo = Array.from(document.querySelectorAll(MATH_ELEMENTS)).filter(
    (el) => !el.dataset.mathDone && !el.parentElement.closest("[data-math-done]"),
  );
  if (todo.length === 0) {
    root.dataset.math = "typeset";
    return Promise.resolve();
  }
  root.dataset.math = "pending";
  todo.forEach((el) => { el.dataset.mathDone = "1"; });
  MathJax.texReset(); // equation numbers and labels start afresh
  return MathJax.typesetPromise(todo).then(
    () => { fitDisplayMath(); root.dataset.math = "typeset"; },
    (err) => { root.dataset.math = "error"; throw err; },
  );
}

// MathJax 3 cannot break a display equation into lines. One a little wider than the column
// (a notebook's, beside both sidebars, is about 660 px on a 1280-px screen) is set in a smaller
// font to fit, down to MIN_FIT of its size; one wider still scrolls sideways in its own box
// (docs/stylesheets/math.css) instead of running off the page, and should be split in its source.
const MIN_FIT = 0.75;

function fitDisplayMath() {
  for (const box of document.querySelectorAll("mjx-container[display='true']")) {
    const math = box.querySelector("mjx-math");
    if (!math) continue;
    // MathJax sets the container's font size (in %) to match the text; scale from that.
    if (!box.dataset.fontSize) box.dataset.fontSize = box.style.fontSize || "100%";
    const base = parseFloat(box.dataset.fontSize);
    box.style.fontSize = box.dataset.fontSize;
    // The column: a notebook's equation box spans it; Material shrinks a Markdown page's box
    // to its content inside div.arithmatex, with padding.
    const column = box.closest("div.arithmatex") || box;
    const style = getComputedStyle(box);
    const padding = parseFloat(style.paddingLeft) + parseFloat(style.paddingRight);
    const room = column.clientWidth - padding - 2; // a hair of slack for rounding
    let scale = 1;
    // Everything in CommonHTML output is in em, so the width goes with the font size; a second
    // pass corrects for the few parts (rules, borders) that do not scale exactly.
    for (let pass = 0; pass < 2; pass++) {
      const need = math.getBoundingClientRect().width;
      if (need <= room || room <= 0) break;
      scale = Math.max(MIN_FIT, (scale * room) / need);
      box.style.fontSize = `${(base * scale).toFixed(1)}%`;
    }
  }
}

let fitTimer = 0;
window.addEventListener("resize", () => {
  clearTimeout(fitTimer);
  fitTimer = setTimeout(fitDisplayMath, 100);
});

// Material's instant navigation (when enabled) swaps pages without a reload. The first page is
// typeset by startup.ready above (MathJax may still be loading at this first notification).
document$.subscribe(() => {
  if (window.MathJax.typesetPromise && window.MathJax.startup.promise) {
    MathJax.startup.promise = MathJax.startup.promise.then(typesetMathElements);
  }
});
