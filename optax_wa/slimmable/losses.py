"""Contrastive losses and the online distillation of SlimCLR.

Each contrastive loss returns ``(loss, logits)`` where ``logits`` are the raw
cosine similarities (before the temperature): they are what SlimCLR's online
distillation compares between the full network (teacher) and a sub-network
(student). Entries excluded from a softmax (NT-Xent's self-similarities) are
``-inf``; :func:`contrastive_distillation` masks them without producing NaN.
All losses compute in float32.

Bad input: inputs of mismatched shapes and a concrete temperature that is not
``> 0`` (Python or NumPy scalar, or a concrete array) raise a ``ValueError``
naming the argument. A temperature traced under ``jit`` cannot be checked
when the loss is built; a non-positive one makes the loss NaN (never a finite
wrong value).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Masked logits are replaced by this finite value before the softmax so that no
# inf - inf (hence NaN) appears in values or gradients; exp() of it is 0.
_MASKED = -1e30


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    r"""``x / max(||x||, eps)`` along ``axis`` in float32, as PyTorch's ``normalize``.

    The norm is taken on ``x`` scaled by its largest magnitude, so it neither
    overflows (rows of ``1e20``) nor underflows (rows of ``1e-30``), and its
    square root is never differentiated at 0: a row whose norm is below
    ``eps`` is ``x / eps`` with Jacobian ``I / eps``, as released.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa.slimmable import l2_normalize
      >>> l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
      [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    x = jnp.asarray(x, jnp.float32)
    scale = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    scale = jnp.where(scale > 0, scale, 1.0)
    # y = x / scale has entries in [-1, 1] and, unless x = 0, one of them is
    # +-1: its norm r lies in [1, sqrt(D)] and x / max(||x||, eps) =
    # y / max(r, eps / scale) is computed (and differentiated) in range.
    y = x / scale
    sq = jnp.sum(jnp.square(y), axis=axis, keepdims=True)
    positive = sq > 0
    r = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return y / jnp.maximum(r, eps / scale)


def _check_temperature(temperature, name="temperature"):
    """Raises for a concrete temperature that is not > 0 (NumPy scalars too).

    A traced temperature (``jit`` argument, schedule) cannot be checked here;
    the losses then return NaN for a non-positive one (:func:`_positive`).
    """
    if isinstance(temperature, jax.core.Tracer):
        return
    value = np.asarray(temperature)
    if value.ndim or not np.issubdtype(value.dtype, np.number):
        raise TypeError(f"{name} must be a positive scalar, got {temperature!r}.")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {temperature!r}.")


def _positive(value: Array, temperature) -> Array:
    """``value``, or NaN where a traced temperature is not > 0 (never a wrong finite)."""
    return jnp.where(jnp.asarray(temperature) > 0, value, jnp.nan)


def _check_same_shape(fn: str, **arrays):
    shapes = {k: jnp.shape(v) for k, v in arrays.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(
            f"{fn}: {', '.join(shapes)} must be (N, D) arrays of equal shapes, got "
            + ", ".join(f"{k} {v}" for k, v in shapes.items())
            + "."
        )


def _cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean over rows of ``logsumexp(logits) - logits[target]``."""
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


def info_nce(
    query: Array, key: Array, queue: Array, temperature: float = 0.2
) -> tuple[Array, Array]:
    r"""MoCo v2's InfoNCE loss against a queue of negative keys.

    With :math:`q, k` the L2-normalized query and key of one sample and
    :math:`\{n_j\}` the (normalized) queue,

    .. math::
      \ell = -\log \frac{\exp(q\cdot k/\tau)}
      {\exp(q\cdot k/\tau) + \sum_j \exp(q\cdot n_j/\tau)} ,

    averaged over the batch. Keys and queue get no gradient.

    Args:
      query: ``(N, D)`` queries (normalized inside).
      key: ``(N, D)`` positive keys (normalized inside).
      queue: ``(K, D)`` negative keys (normalized inside).
      temperature: :math:`\tau > 0` (0.2 in MoCo v2).

    Returns:
      ``(loss, logits)`` with ``logits`` the raw ``(N, 1 + K)`` cosine
      similarities, the positive in column 0.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from optax_wa.slimmable import info_nce
      >>> q = jax.random.normal(jax.random.key(0), (4, 8))
      >>> queue = jax.random.normal(jax.random.key(1), (16, 8))
      >>> loss, logits = info_nce(q, q, queue)
      >>> logits.shape
      (4, 17)

    References:
      He, Fan, Wu, Xie and Girshick, `Momentum Contrast for Unsupervised Visual
      Representation Learning <https://arxiv.org/abs/1911.05722>`_, CVPR 2020;
      Chen, Fan, Girshick and He, `Improved Baselines with Momentum Contrastive
      Learning <https://arxiv.org/abs/2003.04297>`_, 2020.
    """
    _check_temperature(temperature)
    _check_same_shape("info_nce", query=query, key=key)
    if jnp.ndim(queue) != 2 or jnp.shape(queue)[1] != jnp.shape(query)[1]:
        raise ValueError(
            f"info_nce: queue must be (K, {jnp.shape(query)[1]}) like the queries' "
            f"feature size, got {jnp.shape(queue)}."
        )
    q = l2_normalize(query)
    k = jax.lax.stop_gradient(l2_normalize(key))
    negatives = jax.lax.stop_gradient(l2_normalize(queue))
    positive = jnp.sum(q * k, axis=-1, keepdims=True)
    logits = jnp.concatenate([positive, q @ negatives.T], axis=-1)
    loss = _cross_entropy(logits / temperature, jnp.zeros(q.shape[0], jnp.int32))
    return _positive(loss, temperature), logits


def nt_xent(z1: Array, z2: Array, temperature: float = 0.1) -> tuple[Array, Array]:
    r"""SimCLR's NT-Xent loss over the ``2N`` views of a batch.

    With :math:`z` the ``2N`` L2-normalized embeddings (``z1`` then ``z2``)
    and :math:`p(i)` the other view of sample :math:`i`,

    .. math::
      \ell = \frac{1}{2N} \sum_{i=1}^{2N} -\log
      \frac{\exp(z_i\cdot z_{p(i)}/\tau)}{\sum_{j \ne i} \exp(z_i\cdot z_j/\tau)} .

    Args:
      z1: ``(N, D)`` embeddings of the first views.
      z2: ``(N, D)`` embeddings of the second views.
      temperature: :math:`\tau > 0`.

    Returns:
      ``(loss, logits)`` with ``logits`` the raw ``(2N, 2N)`` cosine
      similarities and ``-inf`` on the diagonal.

    Examples:
      >>> import jax
      >>> from optax_wa.slimmable import nt_xent
      >>> z = jax.random.normal(jax.random.key(0), (4, 8))
      >>> loss, logits = nt_xent(z, z + 0.1)
      >>> logits.shape
      (8, 8)

    References:
      Chen, Kornblith, Norouzi and Hinton, `A Simple Framework for Contrastive
      Learning of Visual Representations <https://arxiv.org/abs/2002.05709>`_,
      ICML 2020.
    """
    _check_temperature(temperature)
    _check_same_shape("nt_xent", z1=z1, z2=z2)
    n = z1.shape[0]
    z = jnp.concatenate([l2_normalize(z1), l2_normalize(z2)], axis=0)
    sim = z @ z.T
    logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, sim)
    targets = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    loss = _cross_entropy(logits / temperature, targets)
    return _positive(loss, temperature), logits


def mocov3_loss(
    q1: Array, q2: Array, k1: Array, k2: Array, temperature: float = 1.0
) -> tuple[Array, tuple[Array, Array]]:
    r"""MoCo v3's symmetrized contrastive loss (in-batch negatives).

    .. math::
      \ell = c(q_1, k_2) + c(q_2, k_1), \qquad
      c(q, k) = 2\tau \cdot \operatorname{CE}\big(q k^\top / \tau,\ \text{diag}\big)

    with L2-normalized rows; the momentum keys get no gradient.

    Args:
      q1: ``(N, D)`` predictor outputs of the first views.
      q2: ``(N, D)`` predictor outputs of the second views.
      k1: ``(N, D)`` momentum-encoder outputs of the first views.
      k2: ``(N, D)`` momentum-encoder outputs of the second views.
      temperature: :math:`\tau > 0` (1.0 for ResNets in MoCo v3).

    Returns:
      ``(loss, (logits_12, logits_21))``, each ``(N, N)`` raw cosine
      similarities (``q1 k2^T`` and ``q2 k1^T``).

    Examples:
      >>> import jax
      >>> from optax_wa.slimmable import mocov3_loss
      >>> x = jax.random.normal(jax.random.key(0), (4, 8))
      >>> loss, (l12, l21) = mocov3_loss(x, x, x, x)
      >>> l12.shape
      (4, 4)

    References:
      Chen, Xie and He, `An Empirical Study of Training Self-Supervised Vision
      Transformers <https://arxiv.org/abs/2104.02057>`_, ICCV 2021.
    """
    _check_temperature(temperature)
    _check_same_shape("mocov3_loss", q1=q1, q2=q2, k1=k1, k2=k2)
    targets = jnp.arange(q1.shape[0])

    def one(q, k):
        logits = l2_normalize(q) @ jax.lax.stop_gradient(l2_normalize(k)).T
        return 2.0 * temperature * _cross_entropy(logits / temperature, targets), logits

    loss12, logits12 = one(q1, k2)
    loss21, logits21 = one(q2, k1)
    return _positive(loss12 + loss21, temperature), (logits12, logits21)


def contrastive_distillation(
    student_logits: Array, teacher_logits: Array, temperature: float = 5.0
) -> Array:
    r"""SlimCLR's online distillation: soft cross-entropy from the full network.

    With :math:`p = \operatorname{softmax}(\operatorname{sg}(t)/T)` the
    teacher's and :math:`s` the student's logits (rows of contrastive
    similarities),

    .. math::
      \mathrm{KD} = T^2 \cdot \frac{1}{N}\sum_{i} \sum_j p_{ij}
      \big(\log p_{ij} - \log \operatorname{softmax}(s_i/T)_j\big) .

    This is the paper's soft cross-entropy minus the teacher's entropy, a
    constant for the student: the gradient is the same, and the value is 0
    exactly when student and teacher agree. Entries that are ``-inf`` (masked)
    in either input are left out of both softmaxes; values and gradients stay
    finite (a fully masked row contributes 0). A NaN (or ``+inf``) logit is
    not a mask: it makes the loss and its gradient NaN, so a diverged network
    is never hidden behind a zero distillation loss.

    Args:
      student_logits: ``(N, C)`` logits of the sub-network.
      teacher_logits: ``(N, C)`` logits of the full network (stop-gradient).
      temperature: :math:`T > 0` (5 for MoCo v2 and SimCLR in SlimCLR).

    Returns:
      The scalar loss (float32).

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa.slimmable import contrastive_distillation
      >>> t = jnp.array([[0.9, 0.1, -jnp.inf]])
      >>> float(contrastive_distillation(t, t))
      0.0

    References:
      Zhao, Wu, Zhu, Ji and Wang, `Slimmable Networks for Contrastive
      Self-supervised Learning <https://arxiv.org/abs/2209.15525>`_, IJCV 2024;
      Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
      <https://arxiv.org/abs/1503.02531>`_, 2015.
    """
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"contrastive_distillation: student {student_logits.shape} and teacher "
            f"{teacher_logits.shape} logits must have equal shapes."
        )
    s = jnp.asarray(student_logits, jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
    temperature = jnp.asarray(temperature, jnp.float32)
    loss = temperature**2 * jnp.mean(_row_kl(s, t, temperature))
    return _positive(loss, temperature)


def _masked_log_softmax(x: Array, valid: Array) -> Array:
    x = jnp.where(valid, x, _MASKED)
    return jnp.where(valid, jax.nn.log_softmax(x, axis=-1), 0.0)


@jax.custom_vjp
def _row_kl(s: Array, t: Array, temperature: Array) -> Array:
    """``sum_j p_j (log p_j - log q_j)`` per row, ``p, q = softmax(t / T), softmax(s / T)``."""
    return _row_kl_fwd(s, t, temperature)[0]


def _row_kl_fwd(s, t, temperature):
    # Student and teacher go through the same operations (no autodiff inside),
    # so equal inputs give bitwise-equal log-probabilities: value and gradient
    # are then exactly 0.
    # Only -inf marks an excluded entry; NaN (and +inf) propagate to the loss.
    valid = ~(jnp.isneginf(s) | jnp.isneginf(t))
    log_q = _masked_log_softmax(s / temperature, valid)
    log_p = _masked_log_softmax(t / temperature, valid)
    p = jnp.where(valid, jnp.exp(log_p), 0.0)
    q = jnp.where(valid, jnp.exp(log_q), 0.0)
    return jnp.sum(p * (log_p - log_q), axis=-1), (p, q, temperature)


def _row_kl_bwd(residuals, g):
    p, q, temperature = residuals
    # d KL / d s = (q - p) / T; the teacher and the temperature get no gradient.
    return (
        g[..., None] * (q - p) / temperature,
        jnp.zeros_like(p),
        jnp.zeros_like(temperature),
    )


_row_kl.defvjp(_row_kl_fwd, _row_kl_bwd)
