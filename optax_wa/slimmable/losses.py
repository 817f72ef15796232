"""Contrastive losses and the online distillation of SlimCLR.

Each contrastive loss returns ``(loss, logits)`` where ``logits`` are the raw
cosine similarities (before the temperature): they are what SlimCLR's online
distillation compares between the full network (teacher) and a sub-network
(student). Entries excluded from a softmax (NT-Xent's self-similarities) are
``-inf``; :func:`contrastive_distillation` masks them without producing NaN.
All losses compute in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Masked logits are replaced by this finite value before the softmax so that no
# inf - inf (hence NaN) appears in values or gradients; exp() of it is 0.
_MASKED = -1e30


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """``x / max(||x||, eps)`` along ``axis`` in float32 (finite at zero).

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa.slimmable import l2_normalize
      >>> l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
      [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    x = jnp.asarray(x, jnp.float32)
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _check_temperature(temperature, name="temperature"):
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"{name} must be > 0, got {temperature!r}.")


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
    q = l2_normalize(query)
    k = jax.lax.stop_gradient(l2_normalize(key))
    negatives = jax.lax.stop_gradient(l2_normalize(queue))
    positive = jnp.sum(q * k, axis=-1, keepdims=True)
    logits = jnp.concatenate([positive, q @ negatives.T], axis=-1)
    loss = _cross_entropy(logits / temperature, jnp.zeros(q.shape[0], jnp.int32))
    return loss, logits


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
    if z1.shape != z2.shape:
        raise ValueError(
            f"nt_xent: z1 {z1.shape} and z2 {z2.shape} must have equal shapes."
        )
    n = z1.shape[0]
    z = jnp.concatenate([l2_normalize(z1), l2_normalize(z2)], axis=0)
    sim = z @ z.T
    logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, sim)
    targets = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    return _cross_entropy(logits / temperature, targets), logits


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
    targets = jnp.arange(q1.shape[0])

    def one(q, k):
        logits = l2_normalize(q) @ jax.lax.stop_gradient(l2_normalize(k)).T
        return 2.0 * temperature * _cross_entropy(logits / temperature, targets), logits

    loss12, logits12 = one(q1, k2)
    loss21, logits21 = one(q2, k1)
    return loss12 + loss21, (logits12, logits21)


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
    finite (a fully masked row contributes 0).

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
    return temperature**2 * jnp.mean(_row_kl(s, t, temperature))


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
    valid = jnp.isfinite(s) & jnp.isfinite(t)
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
