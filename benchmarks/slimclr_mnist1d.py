"""SlimCLR's techniques on MNIST-1D: each width against a random encoder, and ablations.

For each of ``--seeds`` paired seeds (a seed fixes the initialization of the
shared weights, the data order and the augmentations of every method):

* **random**: the randomly initialized encoder, its BatchNorm statistics
  recalibrated on the training signals for every width (the honest baseline:
  what a linear probe gets from random convolutional features);
* **slimclr**: SimCLR with slow start (full width only for the first half),
  online distillation (a = 0.5, T = 5) and loss reweighting (mode 5);
* **no_slow_start**, **no_distill**, **no_reweight**: SlimCLR without one
  of the three techniques (all widths from step 0; a = 0; equal weights);
* **naive**: none of the three.

Every encoder is evaluated by a linear probe per width on its frozen
features. The script prints the accuracy per width and method (mean +- std
over seeds), each method's paired difference to SlimCLR and to the random
encoder (mean and 95% t-interval), and a diagnosis of the online distillation
term on a trained SlimCLR encoder: its value, the small-logit closed form
``0.5 * Var_j(z_i - z_1)`` and the ratio of its gradient to the contrastive
loss's gradient.

    python benchmarks/slimclr_mnist1d.py            # 3 seeds (43 min on a loaded 2-core box)
    python benchmarks/slimclr_mnist1d.py --smoke    # tiny settings, same tables

``--smoke``: one seed, one epoch, tiny channels, the methods random, slimclr
and naive (every code path), compiled without LLVM optimizations.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if "--smoke" in sys.argv:
    # Compiling dominates a smoke run: skip LLVM's optimizations (same results).
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from examples.slimclr import input_pipeline, train  # noqa: E402
from examples.slimclr.configs import mnist1d  # noqa: E402
from optax_wa import slimmable as sl  # noqa: E402

WIDTHS = (1.0, 0.5, 0.25)
TRAINED = ("slimclr", "no_slow_start", "no_distill", "no_reweight", "naive")
METHODS = ("random",) + TRAINED
# --smoke: the code paths of every method (naive turns off all three techniques).
SMOKE_METHODS = ("random", "slimclr", "naive")


def method_config(method: str, seed: int, args):
    config = mnist1d.get_config()
    config.seed = seed
    config.num_epochs = args.epochs
    config.probe_epochs = args.probe_epochs
    config.channels = tuple(args.channels)
    config.widths = WIDTHS
    config.slow_start_fraction = 0.5
    config.loss_weight_mode = 5
    config.distill_weight = 0.5
    if method in ("no_slow_start", "naive"):
        config.slow_start_fraction = 0.0
    if method in ("no_distill", "naive"):
        config.distill_weight = 0.0
    if method in ("no_reweight", "naive"):
        config.loss_weight_mode = 0
    return config


def random_encoder(config, data):
    """Random-init encoder whose BN statistics are the population moments on the data."""
    abstract, params, stats = train.init_model(config)
    graphdef = nnx.graphdef(abstract)
    model = nnx.merge(graphdef, params, stats)
    x = input_pipeline.preprocess(jnp.asarray(data.x_train), data.kind)
    batches = [x[i : i + 500] for i in range(0, len(x), 500)]
    for w in config.widths:
        sl.calibrate_batch_norm(model, w, batches)
    return graphdef, params, nnx.as_pure(nnx.state(model, nnx.BatchStat))


def run_one(method, seed, data, args):
    config = method_config(method, seed, args)
    if method == "random":
        graphdef, params, stats = random_encoder(config, data)
        history = []
    else:
        graphdef, params, stats, history = train.pretrain(config, data, log=False)
    accuracy, _ = train.probe_backbone(graphdef, params, stats, data, config)
    kd = {}
    if history:
        last = history[-1]["distillation"]
        kd = {w: last[str(w)] for w in WIDTHS[1:]}
    return accuracy, kd, (graphdef, params, stats, config)


def kd_diagnosis(graphdef, params, stats, config, data):
    """KD value, its closed form and its gradient relative to the contrastive one.

    On one augmented batch in training mode, as in a train step: ``z_w`` are
    the NT-Xent cosine logits of width ``w``. For logits within [-1, 1] and
    T = 5 both softmaxes are nearly uniform, and T^2 KL(p || q) ~ 0.5 *
    Var_j(z_w - z_1) per row (the second-order expansion of the KL), whatever
    T. The gradients are taken with respect to the width's embeddings.
    """
    x = jnp.asarray(data.x_train[: config.batch_size])
    k1, k2 = jax.random.split(jax.random.key(0))
    v1 = input_pipeline.augment(k1, x, data.kind, config.augment)
    v2 = input_pipeline.augment(k2, x, data.kind, config.augment)

    def ctr(z):
        return sl.nt_xent(*z, config.temperature)[0]

    def distill(z, teacher):
        _, s = sl.nt_xent(*z, config.temperature)
        return sl.contrastive_distillation(s, teacher, config.distill_temperature)

    def norm(g):
        return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in g))

    @jax.jit  # one program (op-by-op dispatch of the model is slow)
    def measures(params, stats):
        model = nnx.merge(graphdef, params, stats)

        def embed(w):
            return (
                model(v1, width=w, use_running_average=False),
                model(v2, width=w, use_running_average=False),
            )

        _, teacher = sl.nt_xent(*embed(1.0), config.temperature)
        out = []
        for w in WIDTHS[1:]:
            z = embed(w)
            _, logits = sl.nt_xent(*z, config.temperature)
            kd = sl.contrastive_distillation(
                logits, teacher, config.distill_temperature
            )
            grad_kd = norm(jax.grad(distill)(z, teacher))
            out.append((kd, logits - teacher, grad_kd / norm(jax.grad(ctr)(z))))
        return out

    rows = {}
    for w, (kd, diff, ratio) in zip(WIDTHS[1:], measures(params, stats)):
        diff = np.asarray(diff)
        diff = diff[~np.eye(len(diff), dtype=bool)].reshape(len(diff), -1)
        closed = 0.5 * float(np.mean(np.var(diff, axis=1)))
        spread = float(np.mean(np.std(diff, axis=1)))
        rows[w] = (float(kd), closed, spread, float(ratio))
    return rows


def interval(diffs):
    from scipy import stats

    diffs = np.asarray(diffs, np.float64)
    if len(diffs) < 2:
        return diffs.mean(), float("nan")
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    return diffs.mean(), half


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--probe-epochs", type=int, default=100)
    parser.add_argument("--channels", type=int, nargs=3, default=(32, 64, 128))
    parser.add_argument(
        "--smoke", action="store_true", help="tiny settings, same tables"
    )
    parser.add_argument("--json", type=str, default=None, help="write raw results here")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.epochs, args.probe_epochs = 1, 1, 1
        args.channels = (4, 8, 8)
    methods = SMOKE_METHODS if args.smoke else METHODS
    trained = tuple(m for m in TRAINED if m in methods)

    # Seeds share every compiled program (the seed only changes array values).
    jax.config.update(
        "jax_compilation_cache_dir", tempfile.mkdtemp(prefix="slimclr_jax_")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    start = time.time()
    base = mnist1d.get_config()
    data = input_pipeline.load(base)
    if args.smoke:
        data = input_pipeline.Dataset(
            data.x_train[:512],
            data.y_train[:512],
            data.x_test[:256],
            data.y_test[:256],
            data.num_classes,
            data.kind,
        )
    print(
        f"MNIST-1D: {len(data.y_train)} train / {len(data.y_test)} test; widths "
        f"{WIDTHS}; channels {tuple(args.channels)}; SimCLR {args.epochs} epochs "
        f"(batch {base.batch_size}); probe {args.probe_epochs} epochs (Adam, "
        f"standardized features); {args.seeds} seeds; devices {jax.devices()}",
        flush=True,
    )
    seeds = list(range(args.seeds))
    results = {m: [] for m in methods}
    kd_values = {m: [] for m in trained}
    diagnosis = []
    for method in methods:
        for seed in seeds:
            acc, kd, encoder = run_one(method, seed, data, args)
            results[method].append(acc)
            if method in trained:
                kd_values[method].append(kd)
            if method == "slimclr":
                diagnosis.append(kd_diagnosis(*encoder, data))
            print(
                f"  {method:13s} seed {seed}: "
                + ", ".join(f"w={w}: {100 * acc[w]:.1f}" for w in WIDTHS),
                flush=True,
            )
        print(f"{method}: {time.time() - start:.0f}s total so far", flush=True)

    print("\nLinear-probe test accuracy (%), mean +- std over seeds")
    print(f"{'method':>13} | " + " | ".join(f"{'w=' + str(w):>13}" for w in WIDTHS))
    for m in methods:
        cells = []
        for w in WIDTHS:
            a = 100 * np.array([r[w] for r in results[m]])
            cells.append(f"{a.mean():6.1f} +- {a.std(ddof=1):4.1f}")
        print(f"{m:>13} | " + " | ".join(f"{c:>13}" for c in cells))

    for ref in ("random", "slimclr"):
        print(f"\nPaired difference method - {ref} (points, mean +- 95% CI half-width)")
        print(f"{'method':>13} | " + " | ".join(f"{'w=' + str(w):>13}" for w in WIDTHS))
        for m in methods:
            if m == ref:
                continue
            cells = []
            for w in WIDTHS:
                d = [100 * (a[w] - b[w]) for a, b in zip(results[m], results[ref])]
                mean, half = interval(d)
                star = "*" if abs(mean) > half else " "
                cells.append(f"{mean:+6.1f} +- {half:4.1f}{star}")
            print(f"{m:>13} | " + " | ".join(f"{c:>14}" for c in cells))
    print("  (* : the 95% interval excludes 0)")

    print("\nDistillation term KD_w in the last epoch (mean over seeds)")
    for m in trained:
        print(
            f"  {m:13s} "
            + ", ".join(
                f"w={w}: {np.mean([k[w] for k in kd_values[m]]):.4f}"
                for w in WIDTHS[1:]
            )
        )
    print(
        "\nDistillation diagnosis on trained SlimCLR encoders (one batch, mean over "
        "seeds): KD, 0.5 Var_j(z_w - z_1), std_j(z_w - z_1), |grad KD| / |grad NT-Xent|"
    )
    for w in WIDTHS[1:]:
        kd, closed, spread, ratio = np.mean([d[w] for d in diagnosis], axis=0)
        print(
            f"  w={w}: KD {kd:.4f}, closed form {closed:.4f}, spread {spread:.3f}, "
            f"gradient ratio {ratio:.3f}"
        )
    print(f"\ntotal {time.time() - start:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "results": {
                        m: [{str(w): a for w, a in r.items()} for r in rs]
                        for m, rs in results.items()
                    },
                    "kd": {
                        m: [{str(w): v for w, v in k.items()} for k in ks]
                        for m, ks in kd_values.items()
                    },
                    "diagnosis": [
                        {str(w): list(v) for w, v in d.items()} for d in diagnosis
                    ],
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
