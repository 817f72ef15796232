"""Learning-trajectory transfer on the digits data set (8x8, bundled with sklearn).

Moves a source network's training onto a new initialization with no training
of the target, comparing the permutation choices of
:func:`optax_wa.transfer.transfer_trajectory` (FGMT, GMT, naive, oracle,
init_matching) on an MLP 64-256-256-10 (``--width``) with T = 10 steps:

(a) random init: the source is trained from scratch on all ten digits; the
    target is a second random init. Target: FGMT test accuracy >= 0.90.
(b) pretrained init: two networks are pretrained on digits 0-4; the first is
    fine-tuned on digits 5-9 (the source trajectory) and the fine-tuning is
    transferred onto the second. Accuracy on the test digits 5-9. Target:
    FGMT >= naive + 0.30.
(c) wall time and gradient calls of each method (FGMT target <= 60 s).

Run from the repository root (about 70 s on 2 CPU cores)::

    python examples/transfer/digits.py --out /tmp/transfer_digits

``--smoke`` runs the same tables with tiny settings in a few seconds.

It prints a table and writes ``results.json`` and ``accuracy.png`` (test
accuracy against the transfer step t for each method) under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

from optax_wa.permutation import MatchingOptions, mlp_spec
from optax_wa.transfer import evaluate_trajectory, transfer_trajectory

METHODS = ("fgmt", "gmt", "naive", "oracle", "init_matching")

# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def load_splits(seed: int = 0):
    """Digits scaled to [0, 1], shuffled and split 1000 / 297 / 500."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    cut = {"train": slice(0, 1000), "val": slice(1000, 1297), "test": slice(1297, None)}
    return {k: (x[s], y[s]) for k, s in cut.items()}


def subset(split, classes):
    x, y = split
    keep = np.isin(y, classes)
    return x[keep], y[keep]


def minibatches(split, batch_size, count, seed):
    """``count`` minibatches drawn without replacement (reshuffled as needed)."""
    x, y = split
    rng = np.random.default_rng(seed)
    out, order = [], np.array([], dtype=np.int64)
    while len(out) < count:
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(y))])
        idx, order = order[:batch_size], order[batch_size:]
        out.append((jnp.asarray(x[idx]), jnp.asarray(y[idx])))
    return out


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


class MLP(nnx.Module):
    def __init__(self, sizes, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


SIZES = (64, 256, 256, 10)
GRAPHDEF = nnx.graphdef(MLP(SIZES, rngs=nnx.Rngs(0)))


def set_width(width: int):
    """Sets the hidden width of the MLP (before anything is traced)."""
    global SIZES, GRAPHDEF
    SIZES = (64, width, width, 10)
    GRAPHDEF = nnx.graphdef(MLP(SIZES, rngs=nnx.Rngs(0)))


def init_params(seed: int):
    """The ``nnx.Param`` leaves of a fresh MLP as a pure dict."""
    return nnx.state(MLP(SIZES, rngs=nnx.Rngs(seed)), nnx.Param).to_pure_dict()


def logits_fn(params, x):
    return nnx.merge(GRAPHDEF, params)(x)


def loss_fn(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(params, x), y
    ).mean()


grad_fn = jax.jit(jax.grad(loss_fn))


@jax.jit
def _accuracy(params, x, y):
    return jnp.mean(jnp.argmax(logits_fn(params, x), -1) == y)


def accuracy(params, split) -> float:
    return float(_accuracy(params, *map(jnp.asarray, split)))


@functools.cache
def sgd_step(lr: float):
    """The optimizer and its jitted step for one learning rate (compiled once)."""
    opt = optax.sgd(lr, momentum=0.9)

    @jax.jit
    def step(params, opt_state, batch):
        grads = grad_fn(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return opt, step


def train(params, split, *, lr, epochs, batch_size, seed):
    """SGD with momentum 0.9 and a constant learning rate; returns the final params."""
    opt, step = sgd_step(lr)
    steps = epochs * max(1, len(split[1]) // batch_size)
    opt_state = opt.init(params)
    for batch in minibatches(split, batch_size, steps, seed):
        params, opt_state = step(params, opt_state, batch)
    return params


# --------------------------------------------------------------------------
# Transfer
# --------------------------------------------------------------------------


def run_methods(source, target_init, target_trained, spec, batches, val, test, args):
    """Runs every method; returns ``{method: summary}``."""
    out = {}
    for method in args.methods:
        start = time.perf_counter()
        result = transfer_trajectory(
            source,
            target_init,
            grad_fn,
            batches,
            spec,
            method=method,
            num_steps=args.steps,
            schedule=args.schedule,
            target_trained=target_trained,
            matching=MatchingOptions(seed=args.seed),
        )
        scored = evaluate_trajectory(result.params, lambda p: accuracy(p, val))
        seconds = time.perf_counter() - start
        test_acc = [accuracy(p, test) for p in result.params]
        out[method] = {
            "test_accuracy_per_step": test_acc,
            "val_accuracy_per_step": scored.scores,
            "final_test_accuracy": test_acc[-1],
            "best_step": scored.best_step,
            "best_step_test_accuracy": test_acc[scored.best_step],
            "grad_calls": result.grad_calls,
            "seconds": seconds,
        }
    return out


def setting_random_init(splits, spec, args):
    """(a): source trained from scratch, target a second random init."""
    source_init, target_init = init_params(args.seed), init_params(args.seed + 1)
    hp = dict(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size)
    source_final = train(source_init, splits["train"], seed=args.seed, **hp)
    target_trained = train(target_init, splits["train"], seed=args.seed + 1, **hp)
    batches = minibatches(
        splits["train"], args.match_batch_size, args.steps, args.seed + 2
    )
    results = run_methods(
        [source_init, source_final],
        target_init,
        target_trained,
        spec,
        batches,
        splits["val"],
        splits["test"],
        args,
    )
    reference = {
        "source_test_accuracy": accuracy(source_final, splits["test"]),
        "target_trained_test_accuracy": accuracy(target_trained, splits["test"]),
    }
    return results, reference


def setting_pretrained(splits, spec, args):
    """(b): pretrain two nets on digits 0-4; transfer the 5-9 fine-tuning of one."""
    first, second = list(range(5)), list(range(5, 10))
    pre = {k: subset(v, first) for k, v in splits.items()}
    fine = {k: subset(v, second) for k, v in splits.items()}
    hp = dict(lr=args.lr, batch_size=args.batch_size)
    source_pre = train(
        init_params(args.seed + 10), pre["train"], epochs=args.epochs, seed=1, **hp
    )
    target_pre = train(
        init_params(args.seed + 11), pre["train"], epochs=args.epochs, seed=2, **hp
    )
    source_ft = train(
        source_pre, fine["train"], epochs=args.finetune_epochs, seed=3, **hp
    )
    target_ft = train(
        target_pre, fine["train"], epochs=args.finetune_epochs, seed=4, **hp
    )
    batches = minibatches(
        fine["train"], args.match_batch_size, args.steps, args.seed + 3
    )
    results = run_methods(
        [source_pre, source_ft],
        target_pre,
        target_ft,
        spec,
        batches,
        fine["val"],
        fine["test"],
        args,
    )
    reference = {
        "source_pretrained_test_accuracy_0_4": accuracy(source_pre, pre["test"]),
        "target_pretrained_test_accuracy_0_4": accuracy(target_pre, pre["test"]),
        "target_pretrained_test_accuracy_5_9": accuracy(target_pre, fine["test"]),
        "source_finetuned_test_accuracy_5_9": accuracy(source_ft, fine["test"]),
        "target_finetuned_test_accuracy_5_9": accuracy(target_ft, fine["test"]),
    }
    return results, reference


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def print_table(title, results, reference):
    print(f"\n{title}")
    for k, v in reference.items():
        print(f"  {k}: {v:.4f}")
    print(
        f"  {'method':<14}{'final acc':>10}{'best step':>10}{'best acc':>10}{'grad calls':>12}{'seconds':>9}"
    )
    for method, r in results.items():
        print(
            f"  {method:<14}{r['final_test_accuracy']:>10.4f}{r['best_step']:>10d}"
            f"{r['best_step_test_accuracy']:>10.4f}{r['grad_calls']:>12d}{r['seconds']:>9.2f}"
        )


def plot(path, panels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False
    )
    for ax, (title, results) in zip(axes[0], panels):
        for method, r in results.items():
            acc = r["test_accuracy_per_step"]
            ax.plot(range(len(acc)), acc, marker="o", ms=3, label=method)
        ax.set_title(title)
        ax.set_xlabel("transfer step t")
        ax.set_ylabel("test accuracy (no training of the target)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/transfer_digits")
    parser.add_argument("--steps", type=int, default=10, help="transfer steps T")
    parser.add_argument("--schedule", default="uniform", choices=("uniform", "cosine"))
    parser.add_argument(
        "--lr", type=float, default=0.05, help="source/target SGD learning rate"
    )
    parser.add_argument(
        "--epochs", type=int, default=20, help="epochs of (pre)training"
    )
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--match-batch-size",
        type=int,
        default=256,
        help="minibatch of each gradient pair",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=256, help="hidden width")
    parser.add_argument("--only", choices=("a", "b"), default=None)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings (width 32, T = 2, one epoch, matching batches of 64): "
        "same tables",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.epochs, args.finetune_epochs = 2, 1, 1
        args.match_batch_size, args.width = 64, 32
    set_width(args.width)

    print(f"devices: {jax.devices()}, args: {vars(args)}")
    os.makedirs(args.out, exist_ok=True)
    splits = load_splits()
    spec = mlp_spec(MLP(SIZES, rngs=nnx.Rngs(0)))
    report, panels = {"args": vars(args)}, []
    if args.only in (None, "a"):
        results, reference = setting_random_init(splits, spec, args)
        print_table("(a) random init, all digits", results, reference)
        report["random_init"] = {"reference": reference, "methods": results}
        panels.append(("(a) random init", results))
    if args.only in (None, "b"):
        results, reference = setting_pretrained(splits, spec, args)
        print_table(
            "(b) pretrained on 0-4, transfer of fine-tuning on 5-9", results, reference
        )
        report["pretrained"] = {"reference": reference, "methods": results}
        panels.append(("(b) pretrained 0-4 -> 5-9", results))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(os.path.join(args.out, "accuracy.png"), panels)
    print(f"\nwrote {args.out}/results.json and {args.out}/accuracy.png")


if __name__ == "__main__":
    main()
