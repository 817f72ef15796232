"""SlimCLR: contrastive pretraining of a slimmable encoder, then a switchable probe.

The sections below follow one run of :func:`train_and_evaluate`:

1. **Model and optimizer.** A slimmable encoder (1-D CNN or CIFAR ResNet)
   whose widths share weights; the optimizer chain records the
   gradient-imbalance ratio (:func:`optax_wa.slimmable.slimmable_grad_stats`)
   and holds the sub-widths' switchable norms fixed until the slow-start
   switch (:func:`optax_wa.freeze_until`).
2. **Pretraining.** Each step draws two augmented views on the device, runs
   every width in training mode and builds the loss vector ``[L_1..L_W,
   KD_1..KD_W]`` (contrastive losses, then online distillation from the full
   width). The slow-start coefficients
   (:func:`optax_wa.slimmable.slow_start_schedule`) weight it, and one
   :func:`jax.vjp` gives the gradient
   (:func:`optax_wa.slimmable.weighted_value_and_grad`). Before the switch a
   second program runs the full width only, so slow start also saves the
   sub-widths' compute; each of the two programs compiles once. SimCLR uses NT-Xent
   on the two views; MoCo v2 uses InfoNCE against a queue and a momentum key
   encoder (:func:`optax_wa.slimmable.update_key_encoder`) that computes the
   keys with its own batch statistics (MoCo's cross-device shuffled BN is not
   reproduced); MoCo v3 uses the symmetrized loss of a slimmable predictor
   against the full-width momentum encoder, whose momentum rises from
   ``config.key_momentum`` to 1 on a cosine
   (:func:`optax_wa.slimmable.moco_momentum`). ``config.slim_start_lr``
   resets the base learning rate at the switch, as released, and
   ``config.optimizer="lars"`` is the released LARS (:func:`lars`).
3. **Switchable linear probe.** The frozen backbone (running statistics,
   eval mode) gives the features of each width; one linear head per width
   (:class:`optax_wa.slimmable.SwitchableLinear`) is trained on them and
   evaluated on the test set: Adam on standardized features (default) or the
   released protocol (``config.probe="released"``: SGD on raw features,
   sub-width heads distilled from the full-width head).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from examples.slimclr import input_pipeline
from examples.trainer import data as trainer_data
from examples.trainer.metrics import MetricWriter
from optax_wa import slimmable as sl

PyTree = Any


# ----------------------------------------------------------------------------
# 1. Model and optimizer


FRAMEWORKS = ("simclr", "mocov2", "mocov3")


def _check_framework(config):
    if config.framework not in FRAMEWORKS:
        raise ValueError(
            f"config.framework must be one of {FRAMEWORKS}, got {config.framework!r}."
        )


class WithPredictor(nnx.Module):
    """A slimmable encoder and MoCo v3's slimmable predictor.

    ``model(x)`` is the encoder's projection (what the momentum encoder
    computes), ``model.predict(x)`` the predictor on top of it, and
    ``model.features`` the backbone representation the probe reads.
    """

    def __init__(self, encoder, predictor):
        self.encoder = encoder
        self.predictor = predictor
        self.widths = encoder.widths
        self.num_features = encoder.num_features
        self.features_sliced = encoder.features_sliced

    def feature_dim(self, width: float) -> int:
        return self.encoder.feature_dim(width)

    def features(self, x, width: float = 1.0, use_running_average=None):
        return self.encoder.features(x, width, use_running_average)

    def __call__(self, x, width: float = 1.0, use_running_average=None):
        return self.encoder(x, width, use_running_average)

    def predict(self, x, width: float = 1.0, use_running_average=None):
        z = self.encoder(x, width, use_running_average)
        return self.predictor(z, width, use_running_average)


def create_model(config, rngs: nnx.Rngs):
    """The slimmable encoder of ``config.model`` with the framework's released head.

    SimCLR's head ends with a switchable BatchNorm, MoCo v2's is ``Linear ->
    ReLU -> Linear``; MoCo v3 adds a slimmable predictor (:class:`WithPredictor`)
    and both of its MLPs have ``config.mlp_dim`` hidden units (the
    representation size if ``None``).
    """
    _check_framework(config)
    widths = tuple(config.widths)
    head = dict(
        projection_dim=config.projection_dim,
        head_hidden=config.get("mlp_dim"),
        head_type=config.framework,
    )
    if config.model == "cnn1d":
        encoder = sl.SlimmableCNN1D(
            1,
            tuple(config.channels),
            widths,
            kernel_size=config.kernel_size,
            rngs=rngs,
            **head,
        )
    elif config.model == "resnet":
        encoder = sl.SlimmableResNet(
            tuple(config.stage_sizes),
            widths,
            num_filters=config.num_filters,
            stem="cifar",
            rngs=rngs,
            **head,
        )
    else:
        raise ValueError(
            f"config.model must be 'cnn1d' or 'resnet', got {config.model!r}."
        )
    if config.framework != "mocov3":
        return encoder
    predictor = sl.SlimmableProjectionHead(
        config.projection_dim,
        config.get("mlp_dim") or encoder.num_features,
        config.projection_dim,
        widths,
        slice_input=False,
        kind="predictor",
        rngs=rngs,
    )
    return WithPredictor(encoder, predictor)


def init_model(config):
    """``(abstract_model, params, batch_stats)`` for ``config.seed``.

    The variables are initialized by one jitted program (many small eager
    initializers would each compile); the abstract model carries the
    structure and the variables' metadata.
    """
    model = nnx.eval_shape(lambda: create_model(config, nnx.Rngs(0)))

    @jax.jit
    def init(key):
        _, params, batch_stats = nnx.split(
            create_model(config, nnx.Rngs(key)), nnx.Param, nnx.BatchStat
        )
        return _pure(params), _pure(batch_stats)

    return (model, *init(jax.random.key(config.seed)))


def _decay_mask(params):
    """Weight decay on kernels only (not on norms' scales and biases)."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def learning_rate_schedule(
    config, total_steps: int, switch_step: int, steps_per_epoch: int
):
    """Linear warmup then cosine, with the released reset at the slow-start switch.

    The base rate is ``config.learning_rate * batch_size / 256``. With
    ``config.slim_start_lr`` set, the rate from the switch on is the same
    cosine with that base rate (scaled the same way), as the released trainer
    resets the scheduler's initial rate when the sub-networks start training.
    """
    warmup = min(config.warmup_epochs * steps_per_epoch, max(total_steps - 1, 0))
    scale = config.batch_size / 256
    base = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate * scale, warmup, max(total_steps, 1)
    )
    slim_lr = config.get("slim_start_lr")
    if slim_lr is None:
        return base
    if not slim_lr > 0:
        raise ValueError(f"config.slim_start_lr must be > 0, got {slim_lr!r}.")
    ratio = slim_lr / config.learning_rate

    def schedule(count):
        return base(count) * jnp.where(count >= switch_step, ratio, 1.0)

    return schedule


def lars(learning_rate, *, weight_decay, momentum, trust_coefficient=1e-3):
    r"""The released LARS (MoCo v3's, used by SlimCLR) from optax pieces.

    For every kernel (``ndim > 1``): :math:`d = g + \lambda p`, scaled by
    :math:`\eta \lVert p\rVert / \lVert d\rVert` (by 1 where a norm is 0);
    biases and norm parameters get neither. Then heavy-ball momentum and the
    learning rate, in that order: ``mu = m * mu + d; p -= lr * mu``.
    ``optax.lars`` scales by the learning rate before the momentum, which is
    the same for a constant rate but not across the ``slim_start_lr`` reset.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=_decay_mask),
        optax.masked(
            optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient),
            _decay_mask,
        ),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(learning_rate),
    )


def create_optimizer(
    config, model, total_steps: int, switch_step: int, steps_per_epoch: int
):
    """SGD (momentum), AdamW or LARS, warmup + cosine, wrapped for SlimCLR."""
    schedule = learning_rate_schedule(config, total_steps, switch_step, steps_per_epoch)
    if config.optimizer == "sgd":
        base = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
            optax.sgd(schedule, momentum=config.momentum),
        )
    elif config.optimizer == "adamw":
        base = optax.adamw(schedule, weight_decay=config.weight_decay, mask=_decay_mask)
    elif config.optimizer == "lars":
        base = lars(
            schedule,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
            trust_coefficient=config.get("trust_coefficient", 1e-3),
        )
    else:
        raise ValueError(
            "config.optimizer must be 'sgd', 'adamw' or 'lars', "
            f"got {config.optimizer!r}."
        )
    widths = tuple(config.widths)
    chain = []
    if len(widths) > 1:
        chain.append(sl.slimmable_grad_stats(sl.slim_axes_spec(model), min(widths)))
    chain.append(sl.freeze_until(switch_step, sl.sub_width_mask(model), inner=base))
    return optax.chain(*chain)


class TrainState(NamedTuple):
    """Everything that changes during pretraining (pure pytrees)."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    key_params: PyTree  # MoCo momentum encoder (empty for SimCLR)
    key_stats: PyTree
    queue: PyTree


def _pure(state):
    return nnx.as_pure(state)


# ----------------------------------------------------------------------------
# 2. Pretraining


def _loss_vector(params, batch_stats, graphdef, v1, v2, keys, queue, config, widths):
    """Per-width losses ``[L_1..L_W, KD_1..KD_W]`` of the widths in ``widths``.

    Widths of ``config.widths`` not in ``widths`` (before the slow-start switch)
    get zero losses and are not run, so their statistics stay unchanged.
    ``keys`` are the momentum encoder's outputs: the keys of ``v2`` (MoCo
    v2) or of both views (MoCo v3).

    MoCo v3 (as released): ``L_i`` is the symmetrized loss
    :func:`~optax_wa.slimmable.mocov3_loss` of the width-``i`` predictions
    against the full-width momentum keys, and ``KD_i`` the distillation of
    both halves' similarity rows toward the full width's.
    """
    model = nnx.merge(graphdef, params, batch_stats)
    all_widths = tuple(config.widths)
    contrast = [jnp.zeros((), jnp.float32) for _ in all_widths]
    distill = [jnp.zeros((), jnp.float32) for _ in all_widths]
    teacher = None
    for i, w in enumerate(widths):
        if config.framework == "simclr":
            z1 = model(v1, width=w, use_running_average=False)
            z2 = model(v2, width=w, use_running_average=False)
            loss, logits = sl.nt_xent(z1, z2, config.temperature)
            logits = (logits,)
        elif config.framework == "mocov2":
            q = model(v1, width=w, use_running_average=False)
            loss, logits = sl.info_nce(q, keys, queue.keys, config.temperature)
            logits = (logits,)
        else:
            q1 = model.predict(v1, width=w, use_running_average=False)
            q2 = model.predict(v2, width=w, use_running_average=False)
            k1, k2 = keys
            loss, logits = sl.mocov3_loss(q1, q2, k1, k2, config.temperature)
        contrast[i] = loss
        if i == 0:
            teacher = logits
        else:
            distill[i] = sum(
                sl.contrastive_distillation(s, t, config.distill_temperature)
                for s, t in zip(logits, teacher)
            )
    losses = jnp.stack(contrast + distill)
    return losses, _pure(nnx.state(model, nnx.BatchStat))


def key_momentum(config, step, total_steps: int):
    """MoCo v2's constant momentum; MoCo v3's cosine rise from ``key_momentum`` to 1."""
    if config.framework == "mocov3":
        return sl.moco_momentum(step, total_steps, config.key_momentum)
    return jnp.asarray(config.key_momentum, jnp.float32)


def make_pretrain_step(
    graphdef, tx, config, kind: str, switch_step: int, total_steps: int = 1
):
    """The jitted pretraining step ``(state, x, key, slim) -> (state, metrics)``.

    ``slim=False`` (before the slow-start switch) runs the full width only; the
    sub-widths' losses are then 0, their statistics untouched, and their
    compute saved. Each value of ``slim`` compiles once; the loss weights are
    a runtime array, so the all-widths program serves the whole second phase.
    (A ``lax.cond`` on the step would give a single program, but on XLA CPU
    it made every step much slower.)
    """
    widths = tuple(config.widths)
    schedule = sl.slow_start_schedule(
        widths,
        switch_step,
        mode=config.loss_weight_mode,
        distill_weight=config.distill_weight,
    )
    momentum_encoder = config.framework in ("mocov2", "mocov3")

    @functools.partial(jax.jit, static_argnames="slim")
    def step(state: TrainState, x, key, slim: bool = True):
        k1, k2 = jax.random.split(key)
        v1 = input_pipeline.augment(k1, x, kind, config.augment)
        v2 = input_pipeline.augment(k2, x, kind, config.augment)
        key_params, key_stats, queue, keys = (
            state.key_params,
            state.key_stats,
            state.queue,
            None,
        )
        if momentum_encoder:
            # Momentum update first (from the parameters before this step's
            # update), then the keys, at full width, in training mode (as
            # released: the momentum encoder keeps its own BN statistics).
            m = key_momentum(config, state.step, total_steps)
            key_params = sl.update_key_encoder(key_params, state.params, m)
            key_model = nnx.merge(graphdef, key_params, key_stats)

            def encode(v):
                return jax.lax.stop_gradient(
                    key_model(v, width=widths[0], use_running_average=False)
                )

            keys = (
                encode(v2) if config.framework == "mocov2" else (encode(v1), encode(v2))
            )
            key_stats = _pure(nnx.state(key_model, nnx.BatchStat))

        weights = schedule(state.step)

        active = widths if slim else widths[:1]
        loss_and_grad = sl.weighted_value_and_grad(
            functools.partial(_loss_vector, widths=active), has_aux=True
        )
        (total, losses, batch_stats), grads = loss_and_grad(
            state.params,
            weights,
            state.batch_stats,
            graphdef,
            v1,
            v2,
            keys,
            queue,
            config,
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if config.framework == "mocov2":
            queue = sl.enqueue(queue, keys)
        metrics = {"loss": total, "losses": losses}
        if len(widths) > 1:
            metrics["imbalance_ratio"] = opt_state[0].mean_ratio
        new_state = TrainState(
            state.step + 1, params, batch_stats, opt_state, key_params, key_stats, queue
        )
        return new_state, metrics

    return step


def pretrain(
    config,
    data: input_pipeline.Dataset,
    *,
    log: bool = True,
    writer: MetricWriter | None = None,
):
    """Pretrains the slimmable encoder; returns ``(graphdef, params, stats, history)``.

    ``history`` holds one entry per epoch: the mean loss, the per-width
    contrastive and distillation losses, and the mean imbalance ratio. A
    ``writer`` gets each epoch's entry as scalars (:func:`epoch_scalars`) at
    the step that ends the epoch.
    """
    _check_framework(config)
    model, params, batch_stats = init_model(config)
    graphdef = nnx.graphdef(model)
    steps_per_epoch = len(data.x_train) // config.batch_size
    total_steps = steps_per_epoch * config.num_epochs
    switch_step = int(round(config.slow_start_fraction * total_steps))
    tx = create_optimizer(config, model, total_steps, switch_step, steps_per_epoch)
    key_params = key_stats = queue = ()
    if config.framework in ("mocov2", "mocov3"):
        # MoCo v3's copy of the predictor is carried along and never used.
        key_params, key_stats = params, batch_stats
    if config.framework == "mocov2":
        queue = sl.init_queue(
            jax.random.key(config.seed + 1), config.queue_size, config.projection_dim
        )
    state = TrainState(
        jnp.zeros([], jnp.int32),
        params,
        batch_stats,
        tx.init(params),
        key_params,
        key_stats,
        queue,
    )
    step = make_pretrain_step(
        graphdef, tx, config, data.kind, switch_step, max(total_steps, 1)
    )
    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed)
    widths = tuple(config.widths)
    history = []
    global_step = 0
    for epoch in range(config.num_epochs):
        t0 = time.time()
        sums = []
        for idx in input_pipeline.epoch_indices(
            len(data.x_train), config.batch_size, rng
        ):
            key, sub = jax.random.split(key)
            slim = len(widths) > 1 and global_step >= switch_step
            state, metrics = step(state, data.x_train[idx], sub, slim=slim)
            global_step += 1
            sums.append(metrics)
        means = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *sums)
        n = len(widths)
        entry = {
            "epoch": epoch + 1,
            "loss": float(means["loss"]),
            "contrastive": dict(
                zip(map(str, widths), np.asarray(means["losses"][:n]).tolist())
            ),
            "distillation": dict(
                zip(map(str, widths), np.asarray(means["losses"][n:]).tolist())
            ),
            "slimmable": bool(epoch * steps_per_epoch >= switch_step),
            "seconds": time.time() - t0,
        }
        if "imbalance_ratio" in means:
            entry["imbalance_ratio"] = float(means["imbalance_ratio"])
        history.append(entry)
        if writer is not None:
            writer.write(global_step, epoch_scalars(entry))
        if log and (epoch + 1) % config.log_every_epochs == 0:
            logging.info(
                "epoch %d loss %.4f contrastive %s distillation %s ratio %s (%.1fs)",
                epoch + 1,
                entry["loss"],
                {w: round(v, 4) for w, v in entry["contrastive"].items()},
                {w: round(v, 4) for w, v in entry["distillation"].items()},
                round(entry.get("imbalance_ratio", float("nan")), 4),
                entry["seconds"],
            )
    return graphdef, state.params, state.batch_stats, history


def epoch_scalars(entry: dict) -> dict[str, float]:
    """An epoch's ``history`` entry as flat scalars (``pretrain/contrastive/0.5``...)."""
    scalars = {}
    for name, value in entry.items():
        if isinstance(value, dict):
            for width, v in value.items():
                scalars[f"pretrain/{name}/{width}"] = float(v)
        else:
            scalars[f"pretrain/{name}"] = float(value)
    return scalars


# ----------------------------------------------------------------------------
# 3. Switchable linear probe


def extract_features(graphdef, params, batch_stats, x, width, kind, batch_size=500):
    """Backbone features of ``x`` at ``width`` in eval mode.

    Returns ``(features, batch_stats_after)``; the statistics come back from
    the model after the calls, so a caller can check that the probe left the
    backbone untouched.
    """

    out = []
    for i in range(0, len(x), batch_size):
        f, batch_stats = _features(
            graphdef, params, batch_stats, x[i : i + batch_size], width, kind
        )
        out.append(np.asarray(f))
    return np.concatenate(out), batch_stats


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _features(graphdef, params, batch_stats, x, width, kind):
    model = nnx.merge(graphdef, params, batch_stats)
    f = model.features(
        input_pipeline.preprocess(x, kind), width=width, use_running_average=True
    )
    return f, _pure(nnx.state(model, nnx.BatchStat))


PROBES = ("adam", "released")


def probe_loss(head, xs, y, widths, distill: bool):
    """Sum over widths of the probe losses; ``xs[i]`` are the features of ``widths[i]``.

    The full width (first) is trained on the cross-entropy. With ``distill``
    (the released linear evaluation, "inplace_distill_mixed") every sub-width
    is trained on ``(CE + soft CE toward softmax(full-width logits)) / 2``, the
    teacher's probabilities held constant; without it on its cross-entropy.
    """
    logits = [head(x, width=w) for w, x in zip(widths, xs)]
    total = optax.softmax_cross_entropy_with_integer_labels(logits[0], y).mean()
    teacher = jax.lax.stop_gradient(jax.nn.softmax(logits[0]))
    for sub in logits[1:]:
        ce = optax.softmax_cross_entropy_with_integer_labels(sub, y).mean()
        if distill:
            soft = optax.softmax_cross_entropy(sub, teacher).mean()
            ce = (ce + soft) / 2
        total += ce
    return total


def train_linear_probe(features, y_train, y_test, num_classes, config, seed):
    """Trains one linear head per width on fixed features; returns test accuracies.

    Args:
      features: ``{width: (train_features, test_features)}``, widest first.

    ``config.probe`` picks the protocol:

    * ``"adam"`` (default): the features are standardized with the training
      mean and standard deviation (an affine map, so the probe stays linear
      in the features); Adam with a cosine rate on the sum of the per-width
      cross-entropies, each head seeing only its width.
    * ``"released"``: SlimCLR's linear evaluation on raw features: SGD with
      momentum ``config.probe_momentum``, no weight decay, a cosine rate, and
      the sub-width heads trained on (CE + soft CE toward the full-width
      head) / 2 (:func:`probe_loss`). The released protocol also augments
      the images (random resized crop and flip); here the features are
      computed once, without augmentation.

    The heads are one :class:`~optax_wa.slimmable.SwitchableLinear`.
    """
    mode = config.get("probe", "adam")
    if mode not in PROBES:
        raise ValueError(f"config.probe must be one of {PROBES}, got {mode!r}.")
    widths = tuple(features)
    prepared = {}
    for w, (tr, te) in features.items():
        if mode == "adam":
            mu, sd = tr.mean(0), tr.std(0) + 1e-6
            tr, te = (tr - mu) / sd, (te - mu) / sd
        prepared[w] = (tr, te)
    dims = [prepared[w][0].shape[1] for w in widths]
    probe = _make_probe(dims, num_classes, widths, seed)
    graphdef, params = nnx.split(probe)
    steps_per_epoch = max(len(y_train) // config.probe_batch_size, 1)
    schedule = optax.cosine_decay_schedule(
        config.probe_learning_rate, steps_per_epoch * config.probe_epochs
    )
    if mode == "adam":
        tx = optax.adam(schedule)
    else:
        tx = optax.sgd(schedule, momentum=config.get("probe_momentum", 0.9))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xs, y):
        def loss_fn(params):
            head = nnx.merge(graphdef, params)
            return probe_loss(head, xs, y, widths, distill=mode == "released")

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    train_x = [prepared[w][0] for w in widths]
    for _ in range(config.probe_epochs):
        for idx in input_pipeline.epoch_indices(
            len(y_train), config.probe_batch_size, rng
        ):
            params, opt_state = step(
                params, opt_state, [x[idx] for x in train_x], y_train[idx]
            )
    head = nnx.merge(graphdef, params)
    accuracy = {}
    for w in widths:
        logits = head(jnp.asarray(prepared[w][1]), width=w)
        accuracy[w] = float(np.mean(np.argmax(np.asarray(logits), -1) == y_test))
    return accuracy, head


def _make_probe(dims, num_classes, widths, seed):
    """A SwitchableLinear whose head for ``widths[i]`` reads ``dims[i]`` features."""
    full = max(dims)
    sliced = any(d != full for d in dims)
    probe = sl.SwitchableLinear(
        full, num_classes, widths, slice_input=sliced, rngs=nnx.Rngs(seed)
    )
    expected = [sl.slim_size(full, w) if sliced else full for w in widths]
    if expected != list(dims):
        raise ValueError(f"feature sizes {dims} do not match widths {widths}.")
    return probe


def probe_backbone(graphdef, params, batch_stats, data, config, widths=None):
    """Switchable linear probe of every width; returns ``(accuracy, stats_after)``."""
    widths = tuple(config.widths) if widths is None else widths
    features = {}
    stats = batch_stats
    for w in widths:
        tr, stats = extract_features(
            graphdef, params, stats, data.x_train, w, data.kind
        )
        te, stats = extract_features(graphdef, params, stats, data.x_test, w, data.kind)
        features[w] = (tr, te)
    accuracy, _ = train_linear_probe(
        features, data.y_train, data.y_test, data.num_classes, config, config.seed
    )
    return accuracy, stats


def raw_input_probe(data, config):
    """Linear probe accuracy on the raw (flattened) inputs."""
    tr = np.asarray(input_pipeline.preprocess(jnp.asarray(data.x_train), data.kind))
    te = np.asarray(input_pipeline.preprocess(jnp.asarray(data.x_test), data.kind))
    features = {1.0: (tr.reshape(len(tr), -1), te.reshape(len(te), -1))}
    accuracy, _ = train_linear_probe(
        features, data.y_train, data.y_test, data.num_classes, config, config.seed
    )
    return accuracy[1.0]


# ----------------------------------------------------------------------------
# Entry point


def train_and_evaluate(config, workdir: str) -> dict:
    """Pretrains, probes every width, writes ``metrics.json`` to ``workdir``.

    Every epoch's losses, and then the probe accuracies, are also written
    as scalars to ``workdir/metrics.jsonl`` and (unless
    ``config.tensorboard`` is off) TensorBoard, at the step that ends the
    epoch (:class:`examples.trainer.metrics.MetricWriter`). With
    ``config.mock_data`` the CIFAR records are random mock records
    (:func:`examples.trainer.data.mock_data`).

    Returns:
      ``{"probe_accuracy": {width: acc}, "history": [...], "switch_epoch": e}``.
    """
    os.makedirs(workdir, exist_ok=True)
    with trainer_data.mock_data(config, policy="code"):
        data = input_pipeline.load(config)
    logging.info(
        "data: %d train / %d test (%s)", len(data.y_train), len(data.y_test), data.kind
    )
    writer = MetricWriter(workdir, tensorboard=config.get("tensorboard", True))
    writer.resume(0)  # a new run: drop the lines of an earlier one
    graphdef, params, batch_stats, history = pretrain(config, data, writer=writer)
    accuracy, stats_after = probe_backbone(graphdef, params, batch_stats, data, config)
    last_step = (len(data.x_train) // config.batch_size) * config.num_epochs
    writer.write(last_step, {f"probe/accuracy/{w}": a for w, a in accuracy.items()})
    writer.close()
    unchanged = all(
        bool(jnp.array_equal(a, b))
        for a, b in zip(jax.tree.leaves(batch_stats), jax.tree.leaves(stats_after))
    )
    for w, acc in accuracy.items():
        logging.info("linear probe accuracy at width %s: %.4f", w, acc)
    result = {
        "probe_accuracy": {str(w): a for w, a in accuracy.items()},
        "history": history,
        "backbone_unchanged_by_probe": unchanged,
    }
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    if config.save_checkpoint:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(
                os.path.abspath(os.path.join(workdir, "checkpoint")),
                {"params": params, "batch_stats": batch_stats},
                force=True,
            )
    result["probe_accuracy"] = accuracy
    return result
