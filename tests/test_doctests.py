"""Runs the ``Examples`` of every public docstring in the library."""

import doctest
import importlib
import pkgutil

import pytest

import optax_wa

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(optax_wa.__path__, prefix="optax_wa.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
