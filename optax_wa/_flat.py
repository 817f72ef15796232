"""Flat buffers: many tensors as one array, and the cut back into tensors.

An operation done once on the concatenation of a model's tensors, instead of
once per tensor, keeps the compiled program's size independent of the
number of tensors: WASH's exchange engine selects and permutes coordinates
of one buffer per kind of tensor (``optax_wa/_exchange.py``), Lookaround and
PAPA take the member mean (or PAPA-2's pair means) of one buffer per dtype
(``optax_wa/averaging.py``).

A buffer holds, per member, the tensors' values one after the other:
``(M, d)`` in stacked mode (the member axis first), ``(d,)`` in named mode.

**Cuts at run-time offsets.** XLA:CPU compiles one kernel per distinct
computation, and a slice of a buffer at a constant offset is a computation
of its own per tensor: 600 tensors of 3 shapes made 400 distinct copy
kernels where the bare optimizer compiles 6 in all. :func:`cut` reads the
offsets from a ``lax.cond`` on a run-time flag whose two branches give the
same offsets, a construct XLA does not fold (an array of offsets through
the same ``cond`` is folded; one scalar per tensor is not): each cut reads
its offset as a kernel parameter, and the cuts of one shape are one kernel
(compile times in benchmarks/README.md, WASH (b2)).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def values_per_member(x, stacked: bool) -> int:
    """Values of one member of ``x``: ``x.shape[1:]`` stacked, ``x.shape`` named."""
    shape = np.shape(x)[1:] if stacked else np.shape(x)
    return int(np.prod(shape, dtype=np.int64))


def offsets_of(sizes: Sequence[int]) -> tuple[int, ...]:
    """Where each tensor starts in the buffer of tensors of ``sizes`` values."""
    if not sizes:
        return ()
    return tuple(int(o) for o in np.cumsum([0, *sizes[:-1]], dtype=np.int64))


def concat(parts: Sequence[jax.Array], stacked: bool) -> jax.Array:
    """The buffer of ``parts``: each flattened per member, then concatenated."""
    flat = [x.reshape((x.shape[0], -1) if stacked else (-1,)) for x in parts]
    return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=-1)


def cut(
    bufs: Sequence[jax.Array],
    offsets: Sequence[int],
    sizes: Sequence[int],
    shapes: Sequence[Sequence[tuple[int, ...]]],
    flag: jax.Array,
) -> list[list[jax.Array]]:
    """The tensors back out of buffers laid out alike: from ``bufs[b]``,
    ``sizes[i]`` values per member from ``offsets[i]`` on its last axis,
    reshaped to ``shapes[b][i]``.

    ``flag`` is any run-time boolean (its value does not matter); the offsets
    are read from a ``lax.cond`` on it, see the module docstring.
    """
    runtime = jax.lax.cond(flag, lambda: _int32s(offsets), lambda: _int32s(offsets))
    return [
        [
            jax.lax.dynamic_slice_in_dim(
                buf, offset, size, axis=-1, allow_negative_indices=False
            ).reshape(shape)
            for offset, size, shape in zip(runtime, sizes, buf_shapes)
        ]
        for buf, buf_shapes in zip(bufs, shapes)
    ]


def _int32s(values):
    return tuple(np.int32(v) for v in values)
