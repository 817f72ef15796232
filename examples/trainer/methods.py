"""The method registry of the examples: a method name -> its optax_wa construction.

Example code, not library API. This is the one place where a method name
becomes a composition of the library; the CIFAR and ImageNet trainers
(:mod:`examples.trainer.loop`, from a config) and ``examples/compare.py``
(from its own settings) both build their optimizers and gradient oracles
here.

A method name is a ``+``-joined list of at most one token per family:

* optimizer: ``sgd`` (default; momentum and coupled weight decay as in the
  CIFAR papers) or ``adamw`` (the trainers' per-member optimizer,
  :func:`base_optimizer`; ``compare.py`` brings its own);
* averaging (:data:`AVERAGING`): ``lookahead`` (``optax.lookahead``, one
  model), ``lookaround``, ``papa`` or ``wash`` (ensembles);
* sharpness (:data:`SHARPNESS`): ``sam``, ``usam``, ``asam`` or ``ssam``
  (Stable SAM on the ``perturbation`` ascent).

So ``"sgd"``, ``"adamw"``, ``"lookahead"``, ``"lookaround"``, ``"papa"``,
``"wash"``, ``"sam"``, ``"usam"``, ``"asam"``, ``"ssam"`` and combinations such
as ``"lookaround+ssam"`` (Lookaround whose members descend along Stable SAM
gradients) are all valid.

Every method runs on the stacked member axis (``M`` members, ``M = 1`` for
a single model). The averaging entry wraps one member's optimizer into the
stacked-mode optimizer of the ensemble (:func:`ensemble_optimizer`;
:func:`optax_wa.members.per_member` for single-model optimizers). The
sharpness entry is the gradient oracle of one member
(:func:`grad_oracle`: :func:`optax_wa.sam_value_and_grad`), vmapped over
members by the caller, so each member's ascent uses its own batch and its
own norms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

import optax_wa
from optax_wa import members

# ---------------------------------------------------------------------------
# The registry: averaging (the ensemble optimizer) and sharpness (the oracle).


def _independent(inner):
    return members.per_member(inner)


def _lookahead(inner, *, sync_period: int, slow_step_size: float):
    return members.per_member(
        optax.lookahead(inner, sync_period=sync_period, slow_step_size=slow_step_size)
    )


def _lookaround(inner, *, sync_period, state_policy: str = "keep"):
    return optax_wa.lookaround(
        inner, sync_period=sync_period, state_policy=state_policy
    )


def _papa(inner, *, alpha, period):
    return optax_wa.papa(inner, alpha=alpha, period=period)


def _wash(
    inner,
    *,
    shuffle_prob: float,
    layer_probs=None,
    shuffle_opt_state: bool = False,
    seed: int = 0,
    depth_order=None,
):
    return optax_wa.wash(
        inner,
        shuffle_prob=shuffle_prob,
        layer_probs=layer_probs,
        shuffle_opt_state=shuffle_opt_state,
        seed=seed,
        **({} if depth_order is None else {"depth_order": depth_order}),
    )


@dataclasses.dataclass(frozen=True)
class ParamsView:
    """How a trainer sees the optimizer's params.

    Most methods optimize the model params directly. ``optax.lookahead``
    optimizes ``LookaheadParams(fast, slow)``: gradients are taken at the fast
    weights and the slow weights are evaluated.
    """

    wrap: Callable[[Any], Any] = lambda params: params
    train: Callable[[Any], Any] = lambda params: params
    evaluate: Callable[[Any], Any] = lambda params: params


_LOOKAHEAD_VIEW = ParamsView(
    wrap=optax.LookaheadParams.init_synced,
    train=lambda p: p.fast,
    evaluate=lambda p: p.slow,
)


@dataclasses.dataclass(frozen=True)
class Averaging:
    """One averaging method of the registry.

    Attributes:
      build: ``(inner, **options) -> GradientTransformationExtraArgs``, the
        stacked-mode optimizer of the ensemble around one member's ``inner``.
      ensemble: whether members interact (Lookaround, PAPA, WASH).
      same_init: whether members start from one point (Lookaround's and
        WASH's rule) rather than from their own keys.
      pull: ``options -> (alpha, sync)`` of the optimizer's own pull toward the
        member mean (:func:`optax_wa.sync_weight`'s arguments), for methods
        that pull; ``None`` otherwise.
      view: how a trainer reads the optimizer's params.
    """

    build: Callable[..., optax.GradientTransformationExtraArgs]
    ensemble: bool = False
    same_init: bool = False
    pull: Callable[[dict], tuple[Any, Any]] | None = None
    view: ParamsView = ParamsView()


AVERAGING: dict[str, Averaging] = {
    "none": Averaging(_independent),
    "lookahead": Averaging(_lookahead, view=_LOOKAHEAD_VIEW),
    "lookaround": Averaging(
        _lookaround,
        ensemble=True,
        same_init=True,
        pull=lambda options: (0.0, options["sync_period"]),
    ),
    "papa": Averaging(
        _papa, ensemble=True, pull=lambda options: (options["alpha"], options["period"])
    ),
    "wash": Averaging(_wash, ensemble=True, same_init=True),
}

# The options of optax_wa.sam_value_and_grad that name each variant (rho,
# adaptive_eta, perturbation... come from the caller).
SHARPNESS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "sam": {},
    "usam": {"perturbation": "usam"},
    "asam": {"adaptive": True},
    "ssam": {"stable": True},
}

OPTIMIZERS = ("sgd", "adamw")


def ensemble_optimizer(
    averaging: str, inner: optax.GradientTransformation, **options
) -> optax.GradientTransformationExtraArgs:
    """The stacked-mode optimizer of ``averaging`` around one member's ``inner``.

    Args:
      averaging: a key of :data:`AVERAGING`.
      inner: one member's optimizer.
      **options: the method's own arguments: ``sync_period`` and
        ``slow_step_size`` (lookahead), ``sync_period`` and ``state_policy``
        (lookaround), ``alpha`` and ``period`` (papa), ``shuffle_prob``,
        ``layer_probs``, ``shuffle_opt_state``, ``seed`` and ``depth_order``
        (wash).
    """
    return AVERAGING[averaging].build(inner, **options)


def grad_oracle(
    sharpness: str, loss_fn: Callable[..., Any], *, has_aux: bool = False, **options
) -> Callable:
    """``(params, *args) -> (value, grads)`` for one member.

    ``value`` is ``loss_fn``'s output (``(loss, aux)`` with ``has_aux``).
    Plain gradients for ``"none"``, else :func:`optax_wa.sam_value_and_grad`
    with the variant's options of :data:`SHARPNESS` and ``options`` (``rho``,
    ``adaptive_eta``, ``perturbation``); the aux (e.g. BatchNorm statistics)
    comes from the clean pass.
    """
    variant = SHARPNESS[sharpness]
    if variant is None:
        return jax.value_and_grad(loss_fn, has_aux=has_aux)
    oracle = optax_wa.sam_value_and_grad(loss_fn, has_aux=has_aux, **variant, **options)

    def value_and_grad(params, *args):
        value, grads, _ = oracle(params, *args)
        return value, grads

    return value_and_grad


# ---------------------------------------------------------------------------
# Method names.


@dataclasses.dataclass(frozen=True)
class Method:
    """A parsed method name."""

    optimizer: str = "sgd"
    averaging: str = "none"
    sharpness: str = "none"

    @property
    def is_ensemble_method(self) -> bool:
        return AVERAGING[self.averaging].ensemble


def parse_method(name: str) -> Method:
    """Parses ``"lookaround+ssam"``-style names (see the module docstring)."""
    families = (
        ("optimizer", OPTIMIZERS),
        ("averaging", tuple(k for k in AVERAGING if k != "none")),
        ("sharpness", tuple(k for k in SHARPNESS if k != "none")),
    )
    fields: dict[str, str] = {}
    for token in name.lower().split("+"):
        token = token.strip()
        for family, choices in families:
            if token in choices:
                if family in fields:
                    raise ValueError(
                        f"config.method {name!r} names two {family} choices "
                        f"({fields[family]!r} and {token!r})."
                    )
                fields[family] = token
                break
        else:
            valid = sum((choices for _, choices in families), ())
            raise ValueError(
                f"config.method {name!r}: unknown token {token!r}; tokens are {valid} "
                "joined with '+'."
            )
    return Method(**fields)


def params_view(method: Method) -> ParamsView:
    return AVERAGING[method.averaging].view


def default_same_init(method: Method) -> bool:
    """Lookaround and WASH start all members from one point; others don't."""
    return AVERAGING[method.averaging].same_init


# ---------------------------------------------------------------------------
# The trainers' config -> the registry's arguments.


def learning_rate_schedule(config, total_steps: int):
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


def averaging_options(
    config,
    method: Method,
    schedule,
    depth_order: Callable | None = None,
    steps_per_epoch: int | None = None,
) -> dict[str, Any]:
    """The registry options of ``method.averaging`` from the config section of that name.

    PAPA's ``alpha`` and ``period`` follow the released recipe
    (:func:`papa_alpha_and_period`); WASH gets ``config.seed`` and
    ``depth_order``.
    """
    if method.averaging == "none":
        return {}
    options = config[method.averaging].to_dict()
    if method.averaging == "papa":
        alpha, period = papa_alpha_and_period(config, schedule, steps_per_epoch)
        options = {"alpha": alpha, "period": period}
    elif method.averaging == "wash":
        options.update(seed=config.seed, depth_order=depth_order)
    return options


def sharpness_options(config, sharpness: str) -> dict[str, Any]:
    """The :func:`grad_oracle` options of ``sharpness`` from ``config.sam``.

    ``rho`` for sam/usam/ssam, ``asam_rho`` and ``adaptive_eta`` for asam;
    ssam renormalizes the ``config.sam.perturbation`` ascent.
    """
    sam = config.sam
    return {
        "none": {},
        "sam": {"rho": sam.rho},
        "usam": {"rho": sam.rho},
        "asam": {"rho": sam.asam_rho, "adaptive_eta": sam.adaptive_eta},
        "ssam": {"rho": sam.rho, "perturbation": sam.perturbation},
    }[sharpness]


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
        ``layer_probs="linear"`` (:func:`optax_wa.shuffling.execution_depth_order`).
      steps_per_epoch: updates per epoch, for PAPA's per-epoch pull schedule.
    """
    inner = base_optimizer(config, method, schedule)
    options = averaging_options(config, method, schedule, depth_order, steps_per_epoch)
    return ensemble_optimizer(method.averaging, inner, **options)


def make_grad_oracle(config, method: Method, loss_fn: Callable[..., Any]) -> Callable:
    """``(params, *args) -> ((loss, aux), grads)`` for one member.

    ``loss_fn(params, *args) -> (loss, aux)``; see :func:`grad_oracle`.
    """
    options = sharpness_options(config, method.sharpness)
    return grad_oracle(method.sharpness, loss_fn, has_aux=True, **options)


def model_state_sync(
    config, method: Method, schedule, steps_per_epoch: int | None = None
) -> Callable | None:
    """What happens to the members' BatchNorm statistics at averaging steps.

    With ``config.bn_sync == "average"`` (default): at every Lookaround sync
    the members' running statistics are replaced by their mean, and at every
    PAPA pull they are pulled toward it with the same weight (the released
    Lookaround code shares one set of buffers across its heads; the released
    PAPA code mixes the whole state dict). The steps and weights are the
    optimizer's own: the registry's ``pull`` of the method, with the same
    options, evaluated by :func:`optax_wa.is_sync_step` and
    :func:`optax_wa.sync_weight`. WASH and ``"none"`` leave them per member;
    the averaged model is evaluated after recalibration in every case.

    Returns:
      ``None``, or ``sync(model_state, count) -> model_state`` to call with the
      number of updates done (a traced int).
    """
    if config.bn_sync not in ("average", "none"):
        raise ValueError(
            f"config.bn_sync must be 'average' or 'none', got {config.bn_sync!r}."
        )
    pull = AVERAGING[method.averaging].pull
    if config.bn_sync == "none" or pull is None:
        return None
    alpha, period = pull(
        averaging_options(config, method, schedule, steps_per_epoch=steps_per_epoch)
    )

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
