"""Sphinx configuration for the optax_wa documentation."""

import optax_wa

project = "optax_wa"
author = "optax_wa contributors"
release = version = optax_wa.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    # Ships a copy of MathJax into _static and points mathjax_path at it, so
    # math renders without network access.
    "sphinx-mathjax-offline",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["dollarmath", "amsmath"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
exclude_patterns = ["_build"]
# furo scrolls wide code blocks horizontally instead of clipping them.
html_theme = "furo"
html_title = f"optax_wa {version}"
nitpicky = False
html_static_path = ["_static"]
html_css_files = ["custom.css"]
