"""The training method as a config choice: optimizer, averaging, sharpness.

A method name is a ``+``-joined list of at most one token per family:

* optimizer: ``sgd`` (default; momentum and coupled weight decay as in the
  CIFAR papers) or ``adamw``;
* averaging: ``lookahead`` (``optax.lookahead``, one model), ``lookaround``,
  ``papa`` or ``wash`` (ensembles);
* sharpness: ``sam``, ``usam``, ``asam`` or ``ssam`` (Stable SAM on the
  ``config.sam.perturbation`` ascent).

So ``"sgd"``, ``"adamw"``, ``"lookahead"``, ``"lookaround"``, ``"papa"``,
``"wash"``, ``"sam"``, ``"usam"``, ``"asam"``, ``"ssam"`` and combinations such
as ``"lookaround+ssam"`` (Lookaround whose members descend along Stable SAM
gradients) are all valid.

Every method runs on the stacked member axis (``M = config.num_members``,
``M = 1`` for a single model). The sharpness-aware gradient is computed by
:func:`optax_wa.sam_value_and_grad` vmapped over members, so each member's
ascent uses its own batch and its own norms; the optimizer then runs in
stacked mode (:func:`optax_wa.members.per_member` for single-model
optimizers, or an ensemble wrapper).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

import optax_wa
from optax_wa import members

OPTIMIZERS = ("sgd", "adamw")
AVERAGING = ("none", "lookahead", "lookaround", "papa", "wash")
SHARPNESS = ("none", "sam", "usam", "asam", "ssam")
ENSEMBLE_AVERAGING = ("lookaround", "papa", "wash")


@dataclasses.dataclass(frozen=True)
class Method:
    """A parsed method name."""

    optimizer: str = "sgd"
    averaging: str = "none"
    sharpness: str = "none"

    @property
    def is_ensemble_method(self) -> bool:
        return self.averaging in ENSEMBLE_AVERAGING


def parse_method(name: str) -> Method:
    """Parses ``"lookaround+ssam"``-style names (see the module docstring)."""
    fields: dict[str, str] = {}
    for token in name.lower().split("+"):
        token = token.strip()
        for family, choices in (
            ("optimizer", OPTIMIZERS),
            ("averaging", AVERAGING[1:]),
            ("sharpness", SHARPNESS[1:]),
        ):
            if token in choices:
                if family in fields:
                    raise ValueError(
                        f"config.method {name!r} names two {family} choices "
                        f"({fields[family]!r} and {token!r})."
                    )
                fields[family] = token
                break
        else:
            valid = OPTIMIZERS + AVERAGING[1:] + SHARPNESS[1:]
            raise ValueError(
                f"config.method {name!r}: unknown token {token!r}; tokens are {valid} "
                "joined with '+'."
            )
    return Method(**fields)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int):
    """Linear warmup then cosine decay (``schedule="cosine"``) or constant."""
    opt = config.optimizer
    warmup = int(opt.warmup_steps)
    if opt.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(opt.learning_rate)
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, opt.learning_rate, warmup),
                optax.constant_schedule(opt.learning_rate),
            ],
            [warmup],
        )
    if opt.schedule != "cosine":
        raise ValueError(
            f"config.optimizer.schedule must be 'cosine' or 'constant', got {opt.schedule!r}."
        )
    return optax.warmup_cosine_decay_schedule(
        0.0 if warmup else opt.learning_rate,
        opt.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=opt.get("end_learning_rate", 0.0),
    )


def base_optimizer(config, method: Method, schedule) -> optax.GradientTransformation:
    """One member's optimizer (the inner optimizer of the ensemble wrappers)."""
    opt = config.optimizer
    parts = []
    if opt.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    if method.optimizer == "sgd":
        if opt.weight_decay:
            parts.append(optax.add_decayed_weights(opt.weight_decay))
        parts.append(
            optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov)
        )
    else:
        parts.append(
            optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
        )
    return optax.chain(*parts)


def papa_alpha_and_period(config, schedule, steps_per_epoch: int | None):
    """PAPA's pull weight and sync schedule as the released code sets them.

    The pull follows the 1st, (k+1)-th, (2k+1)-th… update of every epoch
    (``steps_per_epoch`` given; else every k-th update of the run); with
    ``config.papa.lr_scaled`` the weight scales with the next update's rate over
    the configured base rate (never ``schedule(0)``, which a warmup makes 0).
    """
    alpha = config.papa.alpha
    if config.papa.lr_scaled:
        alpha = optax_wa.papa_lr_scaled_alpha(
            alpha, schedule, config.optimizer.learning_rate
        )
    period = optax_wa.sync_schedule(config.papa.period, steps_per_epoch=steps_per_epoch)
    return alpha, period


def make_optimizer(
    config,
    method: Method,
    schedule,
    depth_order: Callable | None = None,
    steps_per_epoch: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The stacked-mode optimizer of the whole ensemble.

    Args:
      config: the trainer config.
      method: the parsed method.
      schedule: the learning-rate schedule.
      depth_order: ``(path, leaf) -> depth`` of the params, for WASH's
        ``layer_probs="linear"``.
      steps_per_epoch: updates per epoch, for PAPA's per-epoch pull schedule.
    """
    inner = base_optimizer(config, method, schedule)
    if method.averaging == "lookahead":
        la = config.lookahead
        return members.per_member(
            optax.lookahead(
                inner, sync_period=la.sync_period, slow_step_size=la.slow_step_size
            )
        )
    if method.averaging == "lookaround":
        return optax_wa.lookaround(
            inner,
            sync_period=config.lookaround.sync_period,
            state_policy=config.lookaround.state_policy,
        )
    if method.averaging == "papa":
        alpha, period = papa_alpha_and_period(config, schedule, steps_per_epoch)
        return optax_wa.papa(inner, alpha=alpha, period=period)
    if method.averaging == "wash":
        wash = config.wash
        return optax_wa.wash(
            inner,
            shuffle_prob=wash.shuffle_prob,
            layer_probs=wash.layer_probs,
            shuffle_opt_state=wash.shuffle_opt_state,
            seed=config.seed,
            **({"depth_order": depth_order} if wash.layer_probs == "linear" else {}),
        )
    return members.per_member(inner)


def make_grad_oracle(config, method: Method, loss_fn: Callable[..., Any]) -> Callable:
    """``(params, *args) -> ((loss, aux), grads)`` for one member.

    ``loss_fn(params, *args) -> (loss, aux)``. Plain gradients for
    ``sharpness="none"``, else :func:`optax_wa.sam_value_and_grad` with the
    variant's options (the aux, e.g. BatchNorm statistics, comes from the clean
    pass).
    """
    if method.sharpness == "none":
        return jax.value_and_grad(loss_fn, has_aux=True)
    sam = config.sam
    options = dict(rho=sam.rho, has_aux=True)
    if method.sharpness == "usam":
        options.update(perturbation="usam")
    elif method.sharpness == "asam":
        options.update(rho=sam.asam_rho, adaptive=True, adaptive_eta=sam.adaptive_eta)
    elif method.sharpness == "ssam":
        options.update(perturbation=sam.perturbation, stable=True)
    oracle = optax_wa.sam_value_and_grad(loss_fn, **options)

    def value_and_grad(params, *args):
        (loss, aux), grads, _ = oracle(params, *args)
        return (loss, aux), grads

    return value_and_grad


@dataclasses.dataclass(frozen=True)
class ParamsView:
    """How the trainer sees the optimizer's params.

    Most methods optimize the model params directly. ``optax.lookahead``
    optimizes ``LookaheadParams(fast, slow)``: gradients are taken at the fast
    weights and the slow weights are evaluated.
    """

    wrap: Callable[[Any], Any] = lambda params: params
    train: Callable[[Any], Any] = lambda params: params
    evaluate: Callable[[Any], Any] = lambda params: params


def params_view(method: Method) -> ParamsView:
    if method.averaging == "lookahead":
        return ParamsView(
            wrap=optax.LookaheadParams.init_synced,
            train=lambda p: p.fast,
            evaluate=lambda p: p.slow,
        )
    return ParamsView()


def default_same_init(method: Method) -> bool:
    """Lookaround and WASH start all members from one point; others don't."""
    return method.averaging in ("lookaround", "wash")


def model_state_sync(
    config, method: Method, schedule, steps_per_epoch: int | None = None
) -> Callable | None:
    """What happens to the members' BatchNorm statistics at averaging steps.

    With ``config.bn_sync == "average"`` (default): at every Lookaround sync
    the members' running statistics are replaced by their mean, and at every
    PAPA pull they are pulled toward it with the same weight (the released
    Lookaround code shares one set of buffers across its heads; the released
    PAPA code mixes the whole state dict). The steps and weights come from
    :func:`optax_wa.sync_weight` with the optimizer's own schedule, so they are
    the optimizer's. WASH and ``"none"`` leave them per member; the averaged
    model is evaluated after recalibration in every case.

    Returns:
      ``None``, or ``sync(model_state, count) -> model_state`` to call with the
      number of updates done (a traced int).
    """
    if config.bn_sync not in ("average", "none"):
        raise ValueError(
            f"config.bn_sync must be 'average' or 'none', got {config.bn_sync!r}."
        )
    if config.bn_sync == "none" or method.averaging not in ("lookaround", "papa"):
        return None
    if method.averaging == "lookaround":
        alpha, period = 0.0, config.lookaround.sync_period
    else:
        alpha, period = papa_alpha_and_period(config, schedule, steps_per_epoch)

    def sync(model_state, count):
        return jax.lax.cond(
            optax_wa.is_sync_step(period, count),
            lambda s: members.pull_to_mean(
                s, optax_wa.sync_weight(alpha, period, count)
            ),
            lambda s: s,
            model_state,
        )

    return sync
