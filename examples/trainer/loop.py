"""The training loop of the CIFAR and ImageNet trainers.

Example code, not library API. Sections: mesh, model functions, train state,
train step, evaluation, non-finite values, the loop
(:func:`train_and_evaluate`); checkpoints are in
:mod:`examples.trainer.checkpoints`, metrics in :mod:`examples.trainer.metrics`,
the method registry in :mod:`examples.trainer.methods`.

The ensemble is stacked: every leaf of the params, the BatchNorm statistics
and the optimizer state carries the member axis first (``M`` members, ``M=1``
for single-model methods). Members are split over the ``"members"`` mesh axis
and batches over ``"data"``; the train step is one ``jax.jit`` with
``NamedSharding`` in and out shardings and the state donated.

The mesh axes are ``AxisType.Auto``: ``jax.make_mesh`` in jax 0.10 makes
explicit axes, and under explicit axes the batching rule of a convolution
vmapped over the member axis folds that axis into the feature axis, a reshape
that sharding-in-types rejects. Auto axes let XLA's sharding propagation
place the intermediates.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_wa
from examples.trainer import augment, checkpoints, data, methods
from examples.trainer.metrics import MetricWriter
from optax_wa import members
from optax_wa.shuffling import execution_depth_order

# ---------------------------------------------------------------------------
# Mesh.


def make_mesh(num_members: int, members_axis_size: int | None = None) -> Mesh:
    """A ``("members", "data")`` mesh over all devices.

    Args:
      num_members: ``M``; the members axis size must divide it.
      members_axis_size: devices along ``"members"``; default
        ``gcd(M, device_count)``.

    With several processes the devices are laid out process-major, so that
    every process holds a contiguous block of the data axis and all the
    member shards for it (then each process feeds its own slice of the batch).
    """
    count = jax.device_count()
    size = members_axis_size or math.gcd(num_members, count)
    if count % size or num_members % size:
        raise ValueError(
            f"config.mesh_members={size} must divide both the {count} devices and "
            f"the {num_members} members."
        )
    axis_types = (AxisType.Auto, AxisType.Auto)
    if jax.process_count() == 1:
        return jax.make_mesh((size, count // size), ("members", "data"), axis_types)
    if jax.local_device_count() % size:
        raise ValueError(
            f"with several processes the members axis ({size}) must divide the "
            f"{jax.local_device_count()} devices of each process."
        )
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    grid = np.array(devices).reshape(count // size, size).T
    return Mesh(grid, ("members", "data"), axis_types=axis_types)


def member_shardings(tree: Any, mesh: Mesh, num_members: int) -> Any:
    """``P("members")`` for leaves with a leading member axis, replicated otherwise."""

    def one(leaf):
        shape = jnp.shape(leaf)
        spec = P("members") if len(shape) >= 1 and shape[0] == num_members else P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------
# Model functions: a Flax NNX model as pure functions of (params, state).


class ModelFns:
    """Pure functions of one member: ``init``, ``apply``, ``batch_stats``.

    ``params`` are the ``nnx.Param`` variables, ``state`` everything else
    (BatchNorm running statistics; empty for the ViT).
    """

    def __init__(self, create_model: Callable[[nnx.Rngs], nnx.Module]):
        self.create_model = create_model
        abstract = nnx.eval_shape(lambda: create_model(nnx.Rngs(0)))
        self.graphdef, self.abstract_params, self.abstract_state = nnx.split(
            abstract, nnx.Param, ...
        )
        norms = [
            m for _, m in nnx.iter_modules(abstract) if isinstance(m, nnx.BatchNorm)
        ]
        self.has_batch_norm = bool(norms)
        for norm in norms:  # momentum 0: the "running" statistics are the batch's.
            norm.momentum = 0.0
        self.stats_graphdef = nnx.split(abstract, nnx.Param, ...)[0]

    def init(self, key: jax.Array):
        _, params, state = nnx.split(self.create_model(nnx.Rngs(key)), nnx.Param, ...)
        return params, state

    def apply(self, params, state, images, *, train: bool):
        model = nnx.merge(self.graphdef, params, state, copy=True)
        logits = model(images, train=train)
        return logits, nnx.split(model, nnx.Param, ...)[2]

    def batch_stats(self, params, state, images):
        """The BatchNorm statistics of one batch (train-mode forward, momentum 0)."""
        model = nnx.merge(self.stats_graphdef, params, state, copy=True)
        model(images, train=True)
        return nnx.split(model, nnx.Param, ...)[2]


def depth_order(fns: ModelFns, image_shape) -> Callable:
    """``(path, leaf) -> depth`` of one member's params, for WASH's ``layer_probs="linear"``.

    :func:`optax_wa.shuffling.execution_depth_order` of the forward pass (the
    order in which it first reads each tensor); dictionary key order
    (``blocks/10`` before ``blocks/2``, ``head`` before ``stem``) is not one.
    """

    def forward(params, state, images):
        return fns.apply(params, state, images, train=False)[0]

    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return execution_depth_order(
        forward, fns.abstract_params, fns.abstract_state, images
    )


# ---------------------------------------------------------------------------
# Train state and step.


class TrainState(NamedTuple):
    """Everything a checkpoint holds besides the data iterator.

    Attributes:
      step: number of completed train steps (int32 scalar).
      params: the optimizer's params, stacked over members (the model params,
        or ``optax.LookaheadParams`` for ``lookahead``).
      model_state: stacked non-trainable variables (BatchNorm statistics).
      opt_state: the stacked-mode optimizer state.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any


@dataclasses.dataclass
class Setup:
    """The pieces built from a config that the loop and the tests use."""

    config: ml_collections.ConfigDict
    method: methods.Method
    mesh: Mesh
    fns: ModelFns
    view: methods.ParamsView
    tx: optax.GradientTransformationExtraArgs
    schedule: Callable
    num_members: int
    total_steps: int
    state_shardings: Any = None
    steps_per_epoch: int | None = None  # updates per epoch (PAPA's pull schedule)


def _normalize(config, images):
    mean = jnp.asarray(config.image_mean, jnp.float32) * 255.0
    std = jnp.asarray(config.image_std, jnp.float32) * 255.0
    return ((images.astype(jnp.float32) - mean) / std).astype(jnp.dtype(config.dtype))


def _mixup(key, images, targets, alpha: float):
    """Per member: ``lam * x + (1 - lam) * roll(x)``, ``lam ~ Beta(alpha, alpha)``."""
    lam = jax.random.beta(key, alpha, alpha, (images.shape[0],))
    lam_x = lam.reshape((-1,) + (1,) * (images.ndim - 1)).astype(images.dtype)
    images = lam_x * images + (1 - lam_x) * jnp.roll(images, 1, axis=1)
    lam_t = lam[:, None, None]
    return images, lam_t * targets + (1 - lam_t) * jnp.roll(targets, 1, axis=1)


def make_setup(config, create_model, image_shape, num_train_examples) -> Setup:
    method = methods.parse_method(config.method)
    num_members = int(config.num_members)
    if num_members < 1:
        raise ValueError(f"config.num_members must be >= 1, got {num_members}.")
    mesh = make_mesh(num_members, config.get("mesh_members"))
    data_size = mesh.shape["data"]
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % data_size:
            raise ValueError(
                f"config.{name}={config[name]} must be divisible by the data axis ({data_size})."
            )
    if config.num_train_steps > 0:
        total_steps = int(config.num_train_steps)
    else:
        total_steps = int(config.num_epochs * num_train_examples // config.batch_size)
    schedule = methods.learning_rate_schedule(config, total_steps)
    fns = ModelFns(create_model)
    order = None
    if method.averaging == "wash" and config.wash.layer_probs == "linear":
        order = depth_order(fns, image_shape)
    steps_per_epoch = max(int(num_train_examples) // int(config.batch_size), 1)
    tx = methods.make_optimizer(config, method, schedule, order, steps_per_epoch)
    return Setup(
        config=config,
        method=method,
        mesh=mesh,
        fns=fns,
        view=methods.params_view(method),
        tx=tx,
        schedule=schedule,
        num_members=num_members,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )


def init_state(setup: Setup, key: jax.Array) -> TrainState:
    """Initializes the stacked state directly into its shardings.

    The model init and the optimizer init are two programs, so that the
    first (the costlier one to compile) is shared by methods with the same
    member init. Sets ``setup.state_shardings``.
    """
    config, mesh, m = setup.config, setup.mesh, setup.num_members
    same_init = config.get("same_init")
    if same_init is None:
        same_init = methods.default_same_init(setup.method)

    def init_model(key):
        params, model_state = members.init_members(
            setup.fns.init, key, m, same_init=same_init
        )
        return setup.view.wrap(params), model_state

    with jax.set_mesh(mesh):
        params, model_state = jax.jit(
            init_model,
            out_shardings=member_shardings(jax.eval_shape(init_model, key), mesh, m),
        )(key)
        opt_state = jax.jit(
            setup.tx.init,
            out_shardings=member_shardings(
                jax.eval_shape(setup.tx.init, params), mesh, m
            ),
        )(params)
        step = jax.device_put(jnp.zeros([], jnp.int32), NamedSharding(mesh, P()))
        state = TrainState(step, params, model_state, opt_state)
    setup.state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return state


def _all_finite(tree) -> jax.Array:
    """Whether every value of every leaf is finite (``True`` for an empty tree)."""
    flags = [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def member_map_mode(mode: str, mesh: Mesh) -> str:
    """The ``members.map_members`` mode of the train step.

    ``"auto"`` is ``map_members``'s choice (members one after another on CPU,
    one vmapped program elsewhere) on a single device. On a mesh of several
    devices it is ``"vmap"``: the mesh axes here are ``Auto``, so the member
    split is not visible when tracing, and a sequential loop would let XLA
    move members between devices.
    """
    if mode == "auto" and mesh.size > 1:
        return "vmap"
    return mode


def make_train_step(setup: Setup) -> Callable:
    """The jitted ``(state, images, labels) -> (state, metrics, finite)``, state donated.

    ``images``: ``(M, B, H, W, 3)`` uint8, one view per member, sharded
    ``P("members", "data")``; ``labels``: ``(B,)`` int32, ``P("data")``.
    ``finite`` maps ``"train/loss"``, ``"params"``, ``"model_state"`` and
    ``"opt_state"`` to a boolean scalar: whether all its values are finite
    after the step (checked by the loop, see :func:`check_finite`).
    """
    config, fns, view, tx = setup.config, setup.fns, setup.view, setup.tx
    sync = methods.model_state_sync(
        config, setup.method, setup.schedule, setup.steps_per_epoch
    )

    def loss_fn(params, model_state, images, targets):
        logits, new_state = fns.apply(params, model_state, images, train=True)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (new_state, logits)

    oracle = methods.make_grad_oracle(config, setup.method, loss_fn)
    member_map = member_map_mode(config.get("member_map", "auto"), setup.mesh)

    def step(state: TrainState, images, labels):
        x = _normalize(config, images)
        targets = optax.smooth_labels(
            jax.nn.one_hot(labels, config.num_classes), config.label_smoothing
        )
        targets = jnp.broadcast_to(targets, (setup.num_members, *targets.shape))
        if config.mixup_alpha > 0:
            key = jax.random.fold_in(jax.random.key(config.seed + 1), state.step)
            x, targets = _mixup(key, x, targets, config.mixup_alpha)
        (loss, (model_state, logits)), grads = members.map_members(
            oracle, mode=member_map
        )(view.train(state.params), state.model_state, x, targets)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step_count = state.step + 1
        if sync is not None:
            model_state = sync(model_state, step_count)
        metrics = {
            "train/loss": loss.mean(),
            "train/accuracy": (logits.argmax(-1) == labels).mean(),
            "train/learning_rate": jnp.asarray(setup.schedule(state.step), jnp.float32),
        }
        finite = {
            "train/loss": jnp.isfinite(loss).all(),
            "params": _all_finite(params),
            "model_state": _all_finite(model_state),
            "opt_state": _all_finite(opt_state),
        }
        new_state = TrainState(step_count, params, model_state, opt_state)
        return new_state, metrics, finite

    mesh = setup.mesh
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(
            setup.state_shardings,
            NamedSharding(mesh, P("members", "data")),
            NamedSharding(mesh, P("data")),
        ),
        out_shardings=(setup.state_shardings, replicated, replicated),
        donate_argnums=0,
    )


# ---------------------------------------------------------------------------
# Evaluation: every member, the logit ensemble, the recalibrated weight average.


def _average_or_empty(tree):
    """``members.average_members``, or the empty tree (a model without BatchNorm)."""
    return members.average_members(tree) if jax.tree.leaves(tree) else tree


def _one_at_a_time(fn: Callable) -> Callable:
    """``fn``, waiting for its result when there are several processes.

    The evaluation dispatches many independent programs (one per batch); with
    several processes, many of them in flight at once, each waiting in a
    cross-process collective, were seen to deadlock (CPU processes, gloo).
    Waiting for each result keeps one in flight; with one process ``fn``
    is returned as it is.
    """
    if jax.process_count() == 1:
        return fn

    def wait(*args):
        return jax.block_until_ready(fn(*args))

    return wait


class Evaluator:
    """Evaluates members, their logit ensemble and their weight average.

    The averaged model is ``members.average_members`` of the (evaluation view
    of the) params; its BatchNorm statistics are recalibrated on
    ``config.recalibration_batches`` training batches (without augmentation)
    with :func:`optax_wa.recalibrate_batch_stats`.
    """

    def __init__(
        self, setup: Setup, eval_source, eval_transform, recal_source, image_shape
    ):
        self.setup = setup
        self.eval_source, self.eval_transform = eval_source, eval_transform
        self.recal_source, self.image_shape = recal_source, image_shape
        config, fns, mesh = setup.config, setup.fns, setup.mesh
        m = setup.num_members
        replicated = NamedSharding(mesh, P())
        batch_sharding = NamedSharding(mesh, P("data"))

        def eval_step(
            member_params, member_state, avg_params, avg_state, images, labels, mask
        ):
            x = _normalize(config, images)
            stack = lambda ms, a: jnp.concatenate([ms, a[None].astype(ms.dtype)])
            params = jax.tree.map(stack, member_params, avg_params)
            state = jax.tree.map(stack, member_state, avg_state)
            logits = jax.vmap(lambda p, s: fns.apply(p, s, x, train=False)[0])(
                params, state
            )
            ensemble = sum(logits[i] for i in range(m)) / m
            # Rows: the members, the average, the ensemble.
            logits = jnp.concatenate([logits, ensemble[None]])
            correct = ((logits.argmax(-1) == labels) * mask).sum(-1)
            one_hot = jax.nn.one_hot(labels, config.num_classes)
            loss = (optax.softmax_cross_entropy(logits, one_hot) * mask).sum(-1)
            return correct, loss, mask.sum()

        self.eval_step = _one_at_a_time(jax.jit(eval_step, out_shardings=replicated))
        self.average = jax.jit(
            lambda params, state: (
                members.average_members(setup.view.evaluate(params)),
                _average_or_empty(state),
            ),
            out_shardings=replicated,
        )
        self.batch_stats = _one_at_a_time(
            jax.jit(
                lambda ps, images: fns.batch_stats(
                    ps[0], ps[1], _normalize(config, images)
                ),
                in_shardings=(replicated, batch_sharding),
                out_shardings=replicated,
            )
        )

    def recalibrate(self, avg_params, avg_state):
        config = self.setup.config
        batches = (
            data.to_global(self.setup.mesh, images, P("data"))
            for images in data.recalibration_batches(
                self.recal_source,
                self.eval_transform,
                global_batch=config.eval_batch_size,
                num_batches=config.recalibration_batches,
                seed=config.seed,
            )
        )
        stats = optax_wa.recalibrate_batch_stats(
            self.batch_stats, (avg_params, avg_state), batches, jit=False
        )
        return jax.tree.map(lambda s, like: s.astype(like.dtype), stats, avg_state)

    def __call__(self, state: TrainState) -> dict[str, float]:
        setup, config, mesh = self.setup, self.setup.config, self.setup.mesh
        m = setup.num_members
        avg_params, avg_state = self.average(state.params, state.model_state)
        if setup.fns.has_batch_norm and config.recalibration_batches > 0:
            avg_state = self.recalibrate(avg_params, avg_state)
        member_params = setup.view.evaluate(state.params)
        correct = loss = 0.0
        count = 0.0
        for batch in data.eval_batches(
            self.eval_source,
            self.eval_transform,
            global_batch=config.eval_batch_size,
            image_shape=self.image_shape,
        ):
            c, lo, n = self.eval_step(
                member_params,
                state.model_state,
                avg_params,
                avg_state,
                data.to_global(mesh, batch["image"], P("data")),
                data.to_global(mesh, batch["label"], P("data")),
                data.to_global(mesh, batch["mask"], P("data")),
            )
            correct, loss, count = correct + c, loss + lo, count + n
        correct, loss = (
            np.asarray(correct) / float(count),
            np.asarray(loss) / float(count),
        )
        names = [f"member_{i}" for i in range(m)] + ["average", "ensemble"]
        metrics = {}
        for i, name in enumerate(names):
            metrics[f"eval/{name}/accuracy"] = float(correct[i])
            metrics[f"eval/{name}/loss"] = float(loss[i])
        metrics["eval/member_mean/accuracy"] = float(np.mean(correct[:m]))
        return metrics


# ---------------------------------------------------------------------------
# Non-finite values and the summary line.


def _summary(metrics: dict[str, float], num_members: int) -> str:
    parts = [f"members {metrics['eval/member_mean/accuracy']:.4f}"]
    if num_members > 1:
        parts.append(f"ensemble {metrics['eval/ensemble/accuracy']:.4f}")
    parts.append(f"average {metrics['eval/average/accuracy']:.4f}")
    return "eval accuracy: " + ", ".join(parts)


# What the train step checks for finiteness, in the order a message names them.
_CHECKED = ("train/loss", "params", "model_state", "opt_state")


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss, parameter or state value."""


def check_finite(step: int, finite: dict[str, Any], manager) -> None:
    """Raises :class:`NonFiniteError` naming the step and what is not finite.

    Args:
      step: the step that produced ``finite``.
      finite: the train step's ``{name: bool scalar}`` (``True``: all finite).
      manager: the checkpoint manager, to name the last good checkpoint.
    """
    values = jax.device_get(finite)  # a dict comes back with sorted keys
    bad = [name for name in _CHECKED if name in values and not bool(values[name])]
    if bad:
        manager.wait_until_finished()
        last = manager.latest_step()
        kept = (
            "there is no checkpoint"
            if last is None
            else f"the last checkpoint, step {last} in {manager.directory}, is kept"
        )
        raise NonFiniteError(
            f"training stopped at step {step}: non-finite {', '.join(bad)}. "
            f"No checkpoint of this state was written; {kept}."
        )


# ---------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass(frozen=True)
class Task:
    """What a trainer (CIFAR, ImageNet) plugs into the shared loop.

    Attributes:
      create_model: ``rngs -> nnx.Module`` (logits from ``model(x, train=)``).
      train_source / eval_source: random-access sources of
        ``{"image": uint8 (H, W, 3), "label": int}`` records.
      train_base: ``(image, rng) -> image``, the geometric training
        augmentation every member policy starts with.
      eval_transform: ``image -> image`` for evaluation and recalibration.
      image_shape: ``(H, W, 3)`` after the transforms.
    """

    create_model: Callable[[nnx.Rngs], nnx.Module]
    train_source: Any
    eval_source: Any
    train_base: Callable
    eval_transform: Callable
    image_shape: tuple[int, int, int]


def make_task(config, input_pipeline, create_model) -> Task:
    """A :class:`Task` from a trainer's ``input_pipeline`` module and model factory.

    ``input_pipeline`` provides ``get_sources(config)``, ``train_base(config)``,
    ``eval_transform(config)`` and ``image_shape(config)``;
    ``create_model(config, rngs)`` builds one member.
    """
    train_source, eval_source = input_pipeline.get_sources(config)
    return Task(
        create_model=lambda rngs: create_model(config, rngs),
        train_source=train_source,
        eval_source=eval_source,
        train_base=input_pipeline.train_base(config),
        eval_transform=input_pipeline.eval_transform(config),
        image_shape=input_pipeline.image_shape(config),
    )


def member_policies(config, num_members: int) -> list[str]:
    """``config.member_augment`` cycled over the members."""
    policies = list(config.member_augment)
    if not policies:
        raise ValueError("config.member_augment must name at least one policy.")
    return [policies[i % len(policies)] for i in range(num_members)]


def make_train_iterator(config, task: Task, num_members: int) -> Iterator:
    transforms = [
        augment.member_transform(policy, task.train_base)
        for policy in member_policies(config, num_members)
    ]
    loader = data.train_loader(
        task.train_source,
        transforms,
        global_batch=config.batch_size,
        seed=config.seed,
        # Mock records come from a patch of this process's tfds: no workers.
        worker_count=0 if config.get("mock_data") else config.worker_count,
    )
    return iter(loader)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, task: Task
) -> tuple[TrainState, dict[str, float]]:
    """Trains ``config.method`` on ``task``; evaluates, logs and checkpoints.

    Resumes from the latest readable checkpoint in ``workdir`` when there is
    one (see :func:`restore_checkpoint`).

    Raises:
      NonFiniteError: at the first step whose loss, params, model state or
        optimizer state holds a non-finite value, naming the step and which
        of them; nothing of that state is logged, evaluated or saved, and
        the checkpoints written before it are kept.

    Returns:
      The final state and the final evaluation metrics.
    """
    setup = make_setup(
        config, task.create_model, task.image_shape, len(task.train_source)
    )
    writer = MetricWriter(workdir, tensorboard=config.get("tensorboard", True))
    mesh = setup.mesh
    writer.print(
        f"method {config.method} ({setup.method}), {setup.num_members} member(s), "
        f"mesh {dict(mesh.shape)}, {setup.total_steps} steps"
    )
    state = init_state(setup, jax.random.key(config.seed))
    train_step = make_train_step(setup)
    evaluator = Evaluator(
        setup,
        task.eval_source,
        task.eval_transform,
        task.train_source,
        task.image_shape,
    )
    train_iter = make_train_iterator(config, task, setup.num_members)
    manager = checkpoints.checkpoint_manager(workdir, config)
    restored = checkpoints.restore_checkpoint(
        manager, state, train_iter, warn=writer.print
    )
    if restored is not None:
        state = restored
        writer.print(f"resumed from step {int(state.step)}")
    start = int(state.step)
    writer.resume(start)

    progress = None
    if jax.process_index() == 0 and config.progress_bar:
        from tqdm import tqdm

        progress = tqdm(
            total=setup.total_steps, initial=start, desc="train", unit="step"
        )

    eval_metrics: dict[str, float] = {}
    tick = time.perf_counter()
    unchecked = None  # (step, finite) of the previous step, read one step late
    try:
        with jax.set_mesh(mesh):
            for step in range(start + 1, setup.total_steps + 1):
                batch = next(train_iter)
                images = data.to_global(
                    mesh, batch["image"].swapaxes(0, 1), P("members", "data")
                )
                labels = data.to_global(mesh, batch["label"], P("data"))
                state, metrics, finite = train_step(state, images, labels)
                # Reading the previous step's flags lets this step run meanwhile.
                if unchecked is not None:
                    check_finite(*unchecked, manager)
                unchecked = (step, finite)
                last = step == setup.total_steps
                log = step % config.log_every_steps == 0 or last
                evaluate = step % config.eval_every_steps == 0 or last
                save = step % config.checkpoint_every_steps == 0 or last
                if not (log or evaluate or save):
                    if progress is not None:
                        progress.update(1)
                    continue
                # Nothing of a non-finite state is logged, evaluated or saved.
                check_finite(step, finite, manager)
                unchecked = None
                record = {}
                if log:
                    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    record["train/steps_per_second"] = config.log_every_steps / (
                        now - tick
                    )
                    tick = now
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['train/loss']:.4f}")
                if progress is not None:
                    progress.update(1)
                if evaluate:
                    eval_metrics = evaluator(state)
                    record.update(eval_metrics)
                    writer.print(
                        f"step {step}: {_summary(eval_metrics, setup.num_members)}"
                    )
                if record:
                    writer.write(step, record)
                if save:
                    checkpoints.save_checkpoint(manager, state, train_iter)
    finally:
        if progress is not None:
            progress.close()
        manager.wait_until_finished()  # the last good checkpoint is complete
        manager.close()
        writer.close()
    return state, eval_metrics
