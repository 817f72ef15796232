"""Checks and leaf names shared by the modules of the library (private).

One definition each: what counts as a concrete number (never a ``bool``),
whether a value is traced, the floating-point check every member mean needs,
and how a pytree path or path entry is named in messages and specs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def is_traced(x) -> bool:
    """Whether ``x`` is a tracer (its value is known only at run time)."""
    return isinstance(x, jax.core.Tracer)


def is_concrete_number(x) -> bool:
    """A Python or NumPy number, or a concrete array; never a ``bool``.

    ``True`` is an ``int`` to Python but never a meaningful rate, weight or
    radius: a boolean (Python or NumPy scalar) is refused, so that a flag
    passed in the wrong place raises instead of reading as 1.
    """
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, float, np.number)):
        return True
    return isinstance(x, (np.ndarray, jax.Array)) and not is_traced(x)


def key_name(entry) -> str:
    """One path entry as a string: a dict key, a sequence index or an attribute."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaf_name(path) -> str:
    """A leaf's path for messages, as ``jax.tree_util.keystr`` writes it."""
    return jax.tree_util.keystr(path) or "<root>"


def require_floating(fn: str, tree: PyTree) -> None:
    """Raises ``TypeError`` naming the first leaf whose dtype is not floating.

    Members are averaged, and the mean of integers would be truncated (the
    mean of 1 and 2 is not 1), so every averaged leaf must be floating point.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{fn}: leaf {leaf_name(path)} has dtype {dtype}; member means need "
                "floating-point leaves (an integer mean would be truncated). Cast "
                "the leaf to a float dtype or keep it out of the tree."
            )


def differing_leaves(shapes: dict, reference: dict, limit: int = 4) -> list[str]:
    """The first ``limit`` leaf names, sorted, that a ``{name: shape}`` map lacks,
    adds or shapes differently from ``reference``: a short list for a message."""
    diff = set(shapes.items()) ^ set(reference.items())
    return sorted({name for name, _ in diff})[:limit]
