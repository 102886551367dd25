"""Sphinx configuration of the tutorial's site: `make site` writes build/site (open index.html).

The chapters are the committed, executed notebooks (notebooks/ here is a link to the repository's),
read as they are: nothing is executed. Every file a page loads is served from the site itself, so it
reads offline: MathJax 3 comes from the sphinx-mathjax-offline package, not from a CDN.
"""

from pefttutor.publish import notebooks

project = "pefttutor"
author = "the pefttutor authors"
copyright = "2026, the pefttutor authors. Code MIT, text and figures CC BY 4.0"

extensions = ["myst_nb", "sphinx-mathjax-offline"]  # the latter sets mathjax_path to its own copy
include_patterns = ["index.md", *(f"notebooks/{nb.name}" for nb in notebooks())]  # the chapters, nothing else

nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
# ipywidgets need the html-manager from a CDN to show a saved state; without it a widget shows nothing
# (notebooks 05 and 06 say so: their widgets are for a live notebook).
nb_ipywidgets_js = {}

html_theme = "sphinx_book_theme"
html_title = "pefttutor"
html_theme_options = {"show_toc_level": 2}  # the right-hand contents: sections and their subsections
