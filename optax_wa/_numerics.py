r"""Norms that neither overflow, underflow nor differentiate to NaN.

A plain float32 :math:`\sqrt{\sum x^2}` is ``inf`` once an element exceeds
about 1.8e19 (its square passes float32's 3.4e38), is 0 once every element
is below about 1e-19 (the squares leave float32's range), and its gradient
is ``0 * inf = NaN`` at 0. The scaled form

.. math::
  \|x\|_2 = s \sqrt{\textstyle\sum_i (x_i / s)^2}, \qquad s = \max_i |x_i|,

squares numbers in :math:`[0, 1]` only: the largest term is exactly 1, the
sum lies in :math:`[1, n]`, and the result is exact up to rounding for every
finite input (it is ``inf`` only when the norm itself is beyond float32).
The value does not depend on :math:`s`, so :math:`s` is held constant under
differentiation (the gradient is :math:`x / \|x\|`), and the square root is
evaluated at 1 where the sum is 0 (the "double ``where``": the unused branch
then has a finite gradient, which ``where`` multiplies by 0). At
:math:`x = 0` the value and the gradient are both 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp


def accumulation_dtype(dtype):
    """The dtype sums and means accumulate in: float32, or the input's if wider.

    bfloat16 and float16 keep 8 and 11 significant bits, and a sum of ``M``
    of them in their own dtype rounds ``M - 1`` times. float32 (24 bits) holds
    every bfloat16/float16 value exactly and adds a few of them with an error
    far below their own rounding, so a mean or a pull accumulated in float32
    and rounded once to the leaf's dtype is rounded once, not ``M`` times.
    """
    return jnp.promote_types(dtype, jnp.float32)


def global_norm(leaves: Sequence[jax.Array]) -> jax.Array:
    """The L2 norm of all ``leaves`` together, scaled, in float32.

    Safe at 0 (value and gradient 0), finite for every finite input whose
    norm fits float32, ``inf`` when an input is infinite, NaN only when an
    input is NaN. It reads the data twice (the maximum, then the scaled sum
    of squares): one more pass than the plain form.
    """
    leaves = [jnp.asarray(x).astype(jnp.float32) for x in leaves if jnp.size(x)]
    if not leaves:
        return jnp.zeros([], jnp.float32)
    scale = jax.lax.stop_gradient(
        jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
    )
    finite_positive = (scale > 0) & jnp.isfinite(scale)
    safe_scale = jnp.where(finite_positive, scale, 1.0)
    total = sum(jnp.sum(jnp.square(x / safe_scale)) for x in leaves)
    positive = total > 0
    root = jnp.sqrt(jnp.where(positive, total, 1.0))
    norm = jnp.where(positive, safe_scale * root, 0.0)
    # An infinite element: the norm is infinite (never inf / inf = NaN).
    return jnp.where(jnp.isinf(scale), scale, norm)


def safe_ratio(numerator, denominator):
    r"""``numerator / denominator``, 0 where the denominator is 0.

    Both are divided by :math:`c = |\text{denominator}|` (held constant under
    differentiation) before the division, so that the derivative with respect
    to the denominator, :math:`-n / d^2`, is formed from numbers near 1: a
    plain division squares :math:`d` and loses the derivative (or makes it
    ``inf``) once :math:`d` passes about 1e19 or falls below 1e-19.
    ``numerator`` may be an array and ``denominator`` a scalar.
    """
    positive = denominator > 0
    scale = jax.lax.stop_gradient(jnp.where(positive, denominator, 1.0))
    ratio = (numerator / scale) / jnp.where(positive, denominator / scale, 1.0)
    return jnp.where(positive, ratio, 0.0)


class NormFactors(NamedTuple):
    r"""The L2 norm of a weighted tree, :math:`\|t \odot x\|_2`, as three factors.

    ``weight_scale * value_scale * root`` with ``weight_scale`` the largest
    :math:`|t|`, ``value_scale`` the largest :math:`|x|` and ``root`` the
    scaled norm of :math:`(t / \max|t|) \odot (x / \max|x|)`. The products
    :math:`t_i x_i` are never formed: they can pass float32's range (1e20
    times 1e20) while the norm's ratio to another norm does not.
    """

    weight_scale: jax.Array
    value_scale: jax.Array
    root: jax.Array

    def value(self) -> jax.Array:
        """The norm itself: ``inf`` where it lies beyond float32's range."""
        w, v, r = self
        # Multiply the two factors that cannot overflow together first.
        return jnp.where(w > 1.0, w * (v * r), (w * v) * r)


def _max_abs(leaves: Sequence[jax.Array]) -> jax.Array:
    return jax.lax.stop_gradient(
        jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
    )


def _usable_scale(scale: jax.Array) -> jax.Array:
    return jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)


def weighted_norm_factors(
    leaves: Sequence[jax.Array], weights: Sequence[jax.Array | None]
) -> NormFactors:
    r""":class:`NormFactors` of :math:`\|t \odot x\|_2` over all leaves, in float32.

    ``weights[i]`` multiplies ``leaves[i]`` elementwise; ``None`` stands for
    a weight of 1 (all ``None``: :func:`global_norm` in the middle factor,
    one pass less). Both scales are held constant under differentiation (the
    value does not depend on them), so the gradient is that of the norm.
    """
    pairs = [
        (jnp.asarray(x).astype(jnp.float32), t)
        for x, t in zip(leaves, weights)
        if jnp.size(x)
    ]
    one = jnp.ones([], jnp.float32)
    if not pairs:
        return NormFactors(one, jnp.zeros([], jnp.float32), one)
    if all(t is None for _, t in pairs):  # no weights: the plain scaled norm
        return NormFactors(one, global_norm([x for x, _ in pairs]), one)
    weighted = [jnp.asarray(t).astype(jnp.float32) for _, t in pairs if t is not None]
    weight_scale = _max_abs(
        weighted + ([jnp.ones([], jnp.float32)] if len(weighted) < len(pairs) else [])
    )
    value_scale = _max_abs([x for x, _ in pairs])
    w, v = _usable_scale(weight_scale), _usable_scale(value_scale)
    root = global_norm(
        [
            (x / v) / w if t is None else (t.astype(jnp.float32) / w) * (x / v)
            for x, t in pairs
        ]
    )
    return NormFactors(w, v, root)


def ratio_to_norm(numerator, norm: NormFactors, eps) -> jax.Array:
    r"""``numerator / (norm + eps)``: 0 where that denominator is 0, and
    finite where the norm passes float32's range although the ratio does not.

    There ``eps`` is negligible and the numerator is divided by the factors
    one at a time, the larger scale first (each factor is below 3.4e38 and
    the two scales' product above about 1e34 there): the quotient never overflows, and
    it underflows to 0 only where the exact ratio lies below float32's range.
    Both branches see a denominator of 1 where they are not taken, so that
    neither the value nor the gradient of the unused one is NaN.
    """
    denominator = norm.value() + eps
    overflow = jnp.isinf(denominator)
    plain = safe_ratio(numerator, jnp.where(overflow, 1.0, denominator))
    w, v, r = (jnp.where(overflow, f, 1.0) for f in norm)
    # The barriers keep XLA from rewriting a / b / c as a / (b * c), which
    # would form the overflowing product again.
    chained = jax.lax.optimization_barrier(numerator / jnp.maximum(w, v))
    chained = jax.lax.optimization_barrier(chained / jnp.minimum(w, v))
    chained = chained / jnp.where(r > 0, r, 1.0)
    return jnp.where(overflow, chained, plain)


EXCHANGE_TAIL = 1e-9


def count_upper_bound(mean: float, limit: int, tail: float = EXCHANGE_TAIL) -> int:
    """A static bound ``b`` with ``P(X > b) <= tail`` for a sum ``X`` of
    independent Bernoulli variables with ``E[X] = mean`` (hence ``Var X <= mean``).

    Bernstein's inequality, ``P(X - mean >= t) <= exp(-t^2 / (2 (mean + t / 3)))``,
    solved for ``t``; the bound is capped at ``limit`` (the number of variables).
    """
    if mean <= 0.0:
        return 0
    log_inv = math.log(1.0 / tail)
    t = log_inv / 3.0 + math.sqrt((log_inv / 3.0) ** 2 + 2.0 * mean * log_inv)
    return int(min(limit, math.ceil(mean + t)))
