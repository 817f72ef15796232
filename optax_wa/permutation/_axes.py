"""Leaf paths and axis views shared by the permutation modules (internal).

A leaf is named by its path with ``/`` between keys. A leaf's *view* splits
every :class:`SubAxes` axis into its sub-axes (row-major); groups act on the
axes of the view.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_wa._checks import key_name

PyTree = Any


def path_str(path) -> str:
    """``(DictKey('a'), SequenceKey(0), DictKey('kernel'))`` -> ``'a/0/kernel'``.

    A trailing ``.value`` (the array inside an ``nnx.Variable`` of an
    ``nnx.State``) is dropped, so a State and its pure dict share paths.
    """
    parts = list(path)
    if parts and isinstance(parts[-1], jax.tree_util.GetAttrKey):
        if parts[-1].name == "value":
            parts = parts[:-1]
    return "/".join(key_name(p) for p in parts)


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def named_leaves(tree: PyTree) -> dict[str, Any]:
    """The leaves of ``tree`` by the paths a :class:`PermutationSpec` uses.

    Keys are joined with ``/``; the trailing ``.value`` of an ``nnx.Variable``
    is dropped, so an ``nnx.State`` and its pure dict give the same paths.

    Args:
      tree: a pytree.

    Returns:
      ``{path: leaf}`` in tree order.

    Raises:
      ValueError: if two leaves share a path.

    Examples:
      >>> from optax_wa.permutation import named_leaves
      >>> list(named_leaves({"layers": [{"kernel": 1.0, "bias": 2.0}]}))
      ['layers/0/bias', 'layers/0/kernel']
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out: dict[str, Any] = {}
    for path, leaf in flat:
        name = path_str(path)
        if name in out:
            raise ValueError(f"two leaves of the tree share the path {name!r}.")
        out[name] = leaf
    return out


@dataclasses.dataclass(frozen=True)
class SubAxes:
    """An axis viewed as several (row-major), each with its own group.

    For fused projections: the output axis of a fused QKV ``nnx.Linear``
    (size ``3 * heads * head_dim``, laid out as ``(3, heads, head_dim)``) is
    ``SubAxes((3, heads, head_dim), (None, "heads", None))``: whole heads
    move together inside each of the q, k and v blocks.

    Attributes:
      shape: sizes of the sub-axes; their product is the axis size.
      groups: one group (or ``None``) per sub-axis.
    """

    shape: tuple[int, ...]
    groups: tuple[str | None, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "groups", tuple(self.groups))
        if len(self.shape) != len(self.groups) or not self.shape:
            raise ValueError(
                f"SubAxes needs one group per sub-axis, got shape {self.shape} and "
                f"groups {self.groups}."
            )
        for g in self.groups:
            if g is not None and not isinstance(g, str):
                raise TypeError(f"SubAxes: a group is a str or None, got {g!r}.")


def expand(entry: tuple) -> tuple[str | None, ...]:
    """Groups per *view* axis: every :class:`SubAxes` expanded in place."""
    out: list[str | None] = []
    for g in entry:
        out.extend(g.groups if isinstance(g, SubAxes) else (g,))
    return tuple(out)


def view_shape(leaf: str, shape: tuple[int, ...], entry: tuple) -> tuple[int, ...]:
    out: list[int] = []
    for axis, (n, g) in enumerate(zip(shape, entry)):
        if isinstance(g, SubAxes):
            if int(np.prod(g.shape)) != int(n):
                raise ValueError(
                    f"leaf {leaf!r} axis {axis} has size {n} but its SubAxes shape "
                    f"{g.shape} has {int(np.prod(g.shape))} entries."
                )
            out.extend(g.shape)
        else:
            out.append(int(n))
    return tuple(out)


def permute_view(x, groups, perms, except_axis=None, take=jnp.take):
    """Permutes an array in view shape along every grouped axis."""
    for axis, g in enumerate(groups):
        if g is not None and axis != except_axis:
            x = take(x, perms[g], axis=axis)
    return x
