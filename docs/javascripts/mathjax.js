// MathJax 3 configuration, read before MathJax itself loads (see extra_javascript in mkdocs.yml).
// Markdown pages: pymdownx.arithmatex (generic mode) wraps math in <span class="arithmatex">
// \( ... \) </span> or <div class="arithmatex"> \[ ... \] </div>.
// Notebook pages: mkdocs-jupyter leaves $...$ and $$...$$ as they are in the rendered Markdown
// cells (class jp-RenderedMarkdown).
// Only those elements are typeset, so a dollar sign in code or prose elsewhere stays a dollar.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown",
  },
};

// Material's instant navigation swaps pages without a reload; typeset each new page.
document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
