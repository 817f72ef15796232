"""Batch-statistics recalibration after averaging or permuting weights.

The running BatchNorm statistics of an averaged (or permuted, or transferred)
model are not the statistics of its activations. Recalibration re-estimates
them from a few batches as a cumulative average: each batch's statistics
(computed by the model in training mode) enter with weight ``w_b / sum(w)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from optax_wa._numerics import accumulation_dtype

if TYPE_CHECKING:
    from flax import nnx

__all__ = ["recalibrate_batch_stats", "recalibrate_nnx_batch_stats"]

PyTree = Any


def recalibrate_batch_stats(
    batch_stats_fn: Callable[[PyTree, Any], PyTree],
    params: PyTree,
    batches: Iterable[Any],
    *,
    weight_fn: Callable[[Any], float] | None = None,
    jit: bool = True,
) -> PyTree:
    r"""Re-estimates running statistics as the cumulative average over batches.

    .. math::
      s_n = s_{n-1} + \frac{w_n}{W_n}\,\big(x_n - s_{n-1}\big), \qquad
      W_n = \textstyle\sum_{b \le n} w_b ,

    so :math:`s_N = \sum_b w_b x_b / W_N`, where :math:`x_b` is the
    statistics tree of batch :math:`b` (e.g. per-layer means and variances)
    and :math:`w_b` its weight (1 by default; pass the batch size through
    ``weight_fn`` to weight by examples, as PyTorch's ``update_bn`` does).

    Framework-agnostic: ``batch_stats_fn(params, batch)`` returns the
    statistics of one batch in the structure the caller uses for running
    statistics. For Flax NNX models see :func:`recalibrate_nnx_batch_stats`.

    Args:
      batch_stats_fn: ``(params, batch) -> stats`` for one batch.
      params: the (averaged) model parameters.
      batches: an iterable of at least one batch.
      weight_fn: optional ``batch -> weight``, a positive finite number
        (read on the host with ``float``); zero, negative, NaN or infinite
        weights raise a ``ValueError``. Non-finite statistics returned by
        ``batch_stats_fn`` are not checked: they propagate into the average.
      jit: whether to ``jax.jit`` ``batch_stats_fn``.

    Returns:
      The averaged statistics tree.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa import recalibrate_batch_stats
      >>> stats_fn = lambda p, x: {"mean": x.mean(0)}
      >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])]
      >>> recalibrate_batch_stats(stats_fn, None, batches)["mean"]
      Array([3.], dtype=float32)
    """
    stats_fn = jax.jit(batch_stats_fn) if jit else batch_stats_fn

    @jax.jit
    def accumulate(avg, stats, fraction):
        return jax.tree.map(
            lambda a, x: a + fraction * (x.astype(a.dtype) - a), avg, stats
        )

    avg = None
    total = 0.0
    for batch in batches:
        weight = 1.0 if weight_fn is None else float(weight_fn(batch))
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(
                f"weight_fn must return a positive finite weight, got {weight}."
            )
        stats = stats_fn(params, batch)
        total += weight
        if avg is None:
            avg = jax.tree.map(
                lambda x: jnp.asarray(x, accumulation_dtype(jnp.asarray(x).dtype)),
                stats,
            )
        else:
            avg = accumulate(avg, stats, jnp.float32(weight / total))
    if avg is None:
        raise ValueError("recalibrate_batch_stats: `batches` yielded no batch.")
    return avg


def recalibrate_nnx_batch_stats(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[Any, Any], Any] | None = None,
    weight_fn: Callable[[Any], float] | None = None,
) -> nnx.Module:
    """Recalibrates the BatchNorm running statistics of a Flax NNX model in place.

    Every ``nnx.BatchNorm`` of ``model`` gets, as running mean and variance,
    the cumulative average of its per-batch statistics over ``batches``
    (see :func:`recalibrate_batch_stats`). Other variables are unchanged. The
    model's BatchNorm settings are restored afterwards.

    Args:
      model: an ``nnx.Module``.
      batches: an iterable of at least one batch.
      forward: ``(model, batch) -> anything``, the forward pass in training
        mode; default ``model(batch)``.
      weight_fn: optional ``batch -> weight``.

    Returns:
      ``model`` (updated in place).
    """
    from flax import nnx

    forward = forward or (lambda m, batch: m(batch))
    work = nnx.clone(model)
    norms = [m for _, m in work.iter_modules() if isinstance(m, nnx.BatchNorm)]
    if not norms:
        raise ValueError("recalibrate_nnx_batch_stats: the model has no nnx.BatchNorm.")
    for norm in norms:
        # momentum 0: the running statistics become the batch's statistics.
        norm.momentum = 0.0
        norm.use_running_average = False
    graphdef, state = nnx.split(work)

    def batch_stats_fn(state, batch):
        m = nnx.merge(graphdef, state)
        forward(m, batch)
        return nnx.state(m, nnx.BatchStat)

    averaged = recalibrate_batch_stats(
        batch_stats_fn, state, batches, weight_fn=weight_fn
    )
    current = nnx.state(model, nnx.BatchStat)
    averaged = jax.tree.map(lambda a, c: a.astype(c.dtype), averaged, current)
    nnx.update(model, averaged)
    return model
