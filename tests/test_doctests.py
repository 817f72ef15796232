"""Runs the ``Examples`` of every public docstring and the examples of the docs.

A docs page (``docs/*.md``) is tested when its fenced ``python`` blocks hold
``>>>`` prompts: the blocks of one page run in order, in one namespace, as a
single doctest.
"""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import optax_wa

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(optax_wa.__path__, prefix="optax_wa.")
)
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def docs_examples(path: pathlib.Path) -> str:
    """The doctest text of a page: its ``python`` blocks that hold prompts."""
    blocks = [b for b in FENCE.findall(path.read_text()) if ">>>" in b]
    return "\n".join(blocks)


PAGES = sorted(p.name for p in DOCS.glob("*.md") if docs_examples(p))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=FLAGS, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_docs_pages_with_examples_are_found():
    assert {"members.md", "nnx.md", "optax.md"} <= set(PAGES), PAGES


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_examples(page):
    text = docs_examples(DOCS / page)
    test = doctest.DocTestParser().get_doctest(text, {}, page, str(DOCS / page), 0)
    assert test.examples, f"no examples parsed in {page}"
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} example(s) failed in docs/{page}"
