"""The SlimCLR example trainer (examples/slimclr) on ``tfds.testing.mock_data``.

Tiny slimmable ResNets, a few steps: SimCLR with the slow-start switch and
MoCo v2 run end to end (pretraining, switchable linear probe, metrics file);
the probe leaves the backbone bit-identical.
"""

from __future__ import annotations

import json
import pathlib
import sys

import chex
import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the examples are not part of the installed package
    sys.path.insert(0, str(ROOT))

import tensorflow_datasets as tfds  # noqa: E402

from examples.slimclr import input_pipeline, train  # noqa: E402
from examples.slimclr.configs import tiny  # noqa: E402
from optax_wa import slimmable as sl  # noqa: E402

NUM_EXAMPLES = 16


def _tiny_config(**overrides):
    config = tiny.get_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def mock_cifar(persistent_compilation_cache):
    """Mock CIFAR-10, with a compilation cache so repeated programs compile once."""
    with tfds.testing.mock_data(
        num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        yield


SIMCLR = dict(framework="simclr", slow_start_fraction=0.5)


def test_tiny_config_with_the_mock_data_flag_runs_offline(
    persistent_compilation_cache, tmp_path, read_scalars
):
    # Before any test opens the module's mock_cifar: only the flag mocks here.
    from examples.slimclr.configs import tiny

    config = tiny.get_config()
    config.mock_data = True
    result = train.train_and_evaluate(config, str(tmp_path))
    assert [e["epoch"] for e in result["history"]] == [1, 2]
    assert set(result["probe_accuracy"]) == {1.0, 0.5}
    # Each epoch's losses, then the probe accuracies, at the step ending the
    # epoch (16 mock records, batch 8: 2 steps per epoch), in metrics.jsonl
    # and TensorBoard.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 4, 4]
    assert records[1]["pretrain/contrastive/0.5"] == pytest.approx(
        result["history"][1]["contrastive"]["0.5"]
    )
    assert records[2]["probe/accuracy/1.0"] == result["probe_accuracy"][1.0]
    scalars = read_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["pretrain/loss"]] == [2, 4]
    assert scalars["probe/accuracy/0.5"] == [
        (4, pytest.approx(result["probe_accuracy"][0.5], rel=1e-6))
    ]


def test_simclr_slow_start_then_all_widths_on_mock_cifar(mock_cifar, tmp_path):
    config = _tiny_config(save_checkpoint=True, **SIMCLR)
    result = train.train_and_evaluate(config, str(tmp_path))
    first, second = result["history"]
    # Epoch 1 is the slow start: only the full width has a loss.
    assert not first["slimmable"] and second["slimmable"]
    assert first["contrastive"]["1.0"] > 0 and first["contrastive"]["0.5"] == 0.0
    assert first["distillation"]["0.5"] == 0.0
    assert second["contrastive"]["0.5"] > 0 and second["distillation"]["0.5"] > 0
    assert np.isfinite(second["imbalance_ratio"]) and second["imbalance_ratio"] > 0
    assert set(result["probe_accuracy"]) == {1.0, 0.5}
    assert all(0.0 <= a <= 1.0 for a in result["probe_accuracy"].values())
    assert result["backbone_unchanged_by_probe"]
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(written["probe_accuracy"]) == {"1.0", "0.5"}
    assert (tmp_path / "checkpoint").exists()


def test_mocov2_on_mock_cifar(mock_cifar, tmp_path):
    config = _tiny_config(framework="mocov2", slow_start_fraction=0.0, num_epochs=1)
    result = train.train_and_evaluate(config, str(tmp_path))
    (epoch,) = result["history"]
    assert epoch["slimmable"]
    for w in ("1.0", "0.5"):
        assert np.isfinite(epoch["contrastive"][w]) and epoch["contrastive"][w] > 0
    assert epoch["distillation"]["0.5"] > 0
    assert set(result["probe_accuracy"]) == {1.0, 0.5}


def test_probe_leaves_backbone_unchanged(mock_cifar):
    config = _tiny_config(**SIMCLR)  # the programs of the first test, from the cache
    data = input_pipeline.load(config)
    assert data.x_train.shape == (NUM_EXAMPLES, 32, 32, 3)
    graphdef, params, stats, _ = train.pretrain(config, data, log=False)
    params_before, stats_before = jax.tree.map(np.array, (params, stats))
    accuracy, stats_after = train.probe_backbone(graphdef, params, stats, data, config)
    assert set(accuracy) == {1.0, 0.5}
    chex.assert_trees_all_equal(stats_after, stats_before)
    chex.assert_trees_all_equal(params, params_before)


def test_unknown_framework_is_rejected(mock_cifar):
    config = _tiny_config(framework="byol")
    data = input_pipeline.load(config)
    with pytest.raises(ValueError, match="framework"):
        train.pretrain(config, data, log=False)


# ----------------------------------------------------------------------------
# MoCo v3 as released: symmetrized loss, cosine momentum, lr reset, LARS.

MOCOV3 = dict(
    framework="mocov3",
    temperature=1.0,
    distill_temperature=1.0,
    mlp_dim=16,
    optimizer="lars",
    learning_rate=0.8,
    slim_start_lr=1.6,
    weight_decay=1e-2,
    key_momentum=0.9,
)


def _np_ctr(q, k, tau):
    """Released ``contrastive_loss``: 2 tau * CE(q k^T / tau, diag), rows normalized."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = q @ k.T / tau
    logits = logits - logits.max(1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return 2 * tau * -np.mean(np.diag(log_p)), q @ k.T


def _np_soft_kl(s, t, temp):
    def log_softmax(x):
        x = x / temp - (x / temp).max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    log_p, log_q = log_softmax(t), log_softmax(s)
    return temp**2 * np.mean(np.sum(np.exp(log_p) * (log_p - log_q), 1))


def _mocov3_setup(config, data):
    from flax import nnx

    model, params, stats = train.init_model(config)
    graphdef = nnx.graphdef(model)
    spe = len(data.x_train) // config.batch_size
    total = spe * config.num_epochs
    switch = int(round(config.slow_start_fraction * total))
    tx = train.create_optimizer(config, model, total, switch, spe)
    state = train.TrainState(
        jax.numpy.zeros([], jax.numpy.int32),
        params,
        stats,
        tx.init(params),
        params,
        stats,
        (),
    )
    step = train.make_pretrain_step(graphdef, tx, config, data.kind, switch, total)
    return graphdef, state, step, total, switch


def test_mocov3_step_equals_released_symmetrized_loss_and_momentum(mock_cifar):
    """Each step: loss == NumPy re-computation; key encoder == NumPy EMA replay."""
    from flax import nnx

    config = _tiny_config(num_epochs=2, slow_start_fraction=0.5, **MOCOV3)
    data = input_pipeline.load(config)
    graphdef, state, step, total, switch = _mocov3_setup(config, data)
    assert total == 4 and switch == 2
    widths = tuple(config.widths)
    key_np = jax.tree.map(lambda a: np.asarray(a, np.float64), state.key_params)
    weights_after = np.asarray(
        sl.slow_start_schedule(
            widths, switch, mode=config.loss_weight_mode, distill_weight=0.5
        )(switch)
    )
    rng = np.random.default_rng(0)
    for t in range(total):
        x = data.x_train[rng.permutation(NUM_EXAMPLES)[: config.batch_size]]
        key = jax.random.key(100 + t)
        # Released momentum: m = 1 - (1 + cos(pi t / T)) / 2 * (1 - m0), applied
        # to the parameters before this step's update, then the keys.
        m = 1 - 0.5 * (1 + np.cos(np.pi * t / total)) * (1 - config.key_momentum)
        key_np = jax.tree.map(
            lambda k, p, m=m: m * k + (1 - m) * np.asarray(p, np.float64),
            key_np,
            state.params,
        )
        k1, k2 = jax.random.split(key)
        v1 = input_pipeline.augment(k1, x, data.kind, config.augment)
        v2 = input_pipeline.augment(k2, x, data.kind, config.augment)
        key_model = nnx.merge(graphdef, state.key_params, state.key_stats)
        nnx.update(key_model, jax.tree.map(jax.numpy.asarray, key_np))
        keys = [
            np.asarray(key_model(v, width=1.0, use_running_average=False))
            for v in (v1, v2)
        ]
        model = nnx.merge(graphdef, state.params, state.batch_stats)
        slim = t >= switch
        active = widths if slim else widths[:1]
        ctr, kd, teacher = {}, {}, None
        for w in active:
            q1, q2 = (
                np.asarray(model.predict(v, width=w, use_running_average=False))
                for v in (v1, v2)
            )
            l12, s12 = _np_ctr(q1, keys[1], config.temperature)
            l21, s21 = _np_ctr(q2, keys[0], config.temperature)
            ctr[w] = l12 + l21
            if teacher is None:
                teacher = (s12, s21)
            else:
                kd[w] = _np_soft_kl(s12, teacher[0], 1.0) + _np_soft_kl(
                    s21, teacher[1], 1.0
                )
        if slim:
            n = len(widths)
            want = sum(weights_after[i] * ctr[w] for i, w in enumerate(widths))
            want += sum(
                weights_after[n + i] * kd[w] for i, w in enumerate(widths[1:], 1)
            )
        else:
            want = ctr[widths[0]]
        state, metrics = step(state, x, key, slim=slim)
        np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
        chex.assert_trees_all_close(
            state.key_params,
            jax.tree.map(lambda a: a.astype(np.float32), key_np),
            rtol=1e-6,
            atol=1e-7,
        )
        if slim:
            assert float(metrics["losses"][len(widths) + 1]) > 0


def test_mocov3_runs_end_to_end(mock_cifar, tmp_path):
    config = _tiny_config(slow_start_fraction=0.5, **MOCOV3)
    result = train.train_and_evaluate(config, str(tmp_path))
    first, second = result["history"]
    assert not first["slimmable"] and second["slimmable"]
    assert first["contrastive"]["0.5"] == 0.0 and second["contrastive"]["0.5"] > 0
    # Symmetrized loss of unit vectors with tau = 1: 2 * (each CE in [0, 2 + log N]).
    for epoch in result["history"]:
        assert 0 < epoch["contrastive"]["1.0"] <= 2 * 2 * (2 + np.log(8))
    assert set(result["probe_accuracy"]) == {1.0, 0.5}


def test_learning_rate_reset_at_the_slow_start_switch():
    config = _tiny_config(
        learning_rate=0.8, slim_start_lr=1.6, warmup_epochs=1, batch_size=64
    )
    total, switch, spe = 40, 20, 4
    schedule = train.learning_rate_schedule(config, total, switch, spe)
    base = 0.8 * 64 / 256
    for t in range(total):
        # Linear warmup over 4 steps, then a cosine over the remaining 36.
        lr = base * t / 4 if t < 4 else base * 0.5 * (1 + np.cos(np.pi * (t - 4) / 36))
        if t >= switch:
            lr *= 2.0  # the released scheduler's init_lr := slim_start_lr
        np.testing.assert_allclose(float(schedule(t)), lr, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="slim_start_lr"):
        train.learning_rate_schedule(
            _tiny_config(slim_start_lr=0.0), total, switch, spe
        )


def test_lars_equals_released_numpy_lars_across_a_rate_jump():
    """The released LARS (wd and trust ratio on kernels only; momentum, then lr)."""
    import jax.numpy as jnp
    import optax

    lrs = np.array([0.5, 0.5, 2.0, 2.0, 0.1])  # a jump, as at the slim_start_lr reset
    schedule = lambda c: jnp.asarray(lrs)[c]  # noqa: E731
    wd, mom, trust = 0.05, 0.9, 1e-3
    rng = np.random.default_rng(1)
    params = {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)}
    grads = [
        {
            "kernel": rng.normal(size=(3, 4)) * 10 ** rng.uniform(-3, 3),
            "bias": rng.normal(size=4),
        }
        for _ in lrs
    ]
    grads[1]["kernel"] = np.zeros((3, 4)) - wd * params["kernel"]  # update norm 0
    tx = train.lars(schedule, weight_decay=wd, momentum=mom, trust_coefficient=trust)
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    state = tx.init(p)
    want = jax.tree.map(np.array, params)
    mu = jax.tree.map(np.zeros_like, params)
    for t, g in enumerate(grads):
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
        for name in want:
            d = np.asarray(g[name], np.float64)
            if want[name].ndim > 1:
                d = d + wd * want[name]
                pn, un = np.linalg.norm(want[name]), np.linalg.norm(d)
                d = d * (trust * pn / un if pn > 0 and un > 0 else 1.0)
            mu[name] = mom * mu[name] + d
            want[name] = want[name] - lrs[t] * mu[name]
        for name in want:
            np.testing.assert_allclose(p[name], want[name], rtol=2e-5, atol=1e-6)
    # optax.lars (learning rate before momentum) differs across the jump.
    ref = optax.lars(
        schedule,
        weight_decay=wd,
        momentum=mom,
        trust_coefficient=trust,
        weight_decay_mask=lambda t: jax.tree.map(lambda a: a.ndim > 1, t),
        trust_ratio_mask=lambda t: jax.tree.map(lambda a: a.ndim > 1, t),
    )
    q = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    s = ref.init(q)
    for g in grads:
        u, s = ref.update(jax.tree.map(jnp.asarray, g), s, q)
        q = optax.apply_updates(q, u)
    assert np.max(np.abs(np.asarray(q["bias"]) - want["bias"])) > 1e-3


# ----------------------------------------------------------------------------
# The released linear evaluation.


def _np_softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def test_released_probe_equals_numpy_sgd_with_distilled_sub_widths():
    """3 SGD steps on raw features: sub-widths on (CE + soft CE to the full head) / 2."""
    rng = np.random.default_rng(7)
    n, c = 12, 3
    widths = (1.0, 0.5)
    y = rng.integers(0, c, n).astype(np.int32)
    # Raw features with an offset and scale the "adam" probe would remove.
    feats = {
        1.0: (5.0 + 3.0 * rng.normal(size=(n, 6)), rng.normal(size=(4, 6))),
        0.5: (5.0 + 3.0 * rng.normal(size=(n, 3)), rng.normal(size=(4, 3))),
    }
    feats = {w: tuple(a.astype(np.float32) for a in f) for w, f in feats.items()}
    config = _tiny_config(
        probe="released",
        probe_epochs=3,
        probe_batch_size=n,
        probe_learning_rate=0.05,
        probe_momentum=0.9,
    )
    seed = 3
    init = train._make_probe([6, 3], c, widths, seed)
    W = [np.asarray(h.kernel[...], np.float64) for h in init.heads]
    b = [np.asarray(h.bias[...], np.float64) for h in init.heads]
    mu_w, mu_b = [np.zeros_like(x) for x in W], [np.zeros_like(x) for x in b]
    onehot = np.eye(c)[y]
    for t in range(3):
        lr = 0.05 * 0.5 * (1 + np.cos(np.pi * t / 3))
        xs = [feats[w][0].astype(np.float64) for w in widths]
        probs = [_np_softmax(x @ Wi + bi) for x, Wi, bi in zip(xs, W, b)]
        teacher = probs[0]
        dlogits = [(probs[0] - onehot) / n]
        for p in probs[1:]:
            dlogits.append(0.5 * (p - onehot) / n + 0.5 * (p - teacher) / n)
        for i in range(2):
            mu_w[i] = 0.9 * mu_w[i] + xs[i].T @ dlogits[i]
            mu_b[i] = 0.9 * mu_b[i] + dlogits[i].sum(0)
            W[i] = W[i] - lr * mu_w[i]
            b[i] = b[i] - lr * mu_b[i]
    accuracy, head = train.train_linear_probe(feats, y, y[:4], c, config, seed)
    for i in range(2):
        np.testing.assert_allclose(
            head.heads[i].kernel[...], W[i], rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(head.heads[i].bias[...], b[i], rtol=1e-4, atol=1e-5)
    # The default protocol standardizes the features: a different result.
    _, adam_head = train.train_linear_probe(
        feats, y, y[:4], c, _tiny_config(probe_epochs=3, probe_batch_size=n), seed
    )
    assert not np.allclose(adam_head.heads[0].kernel[...], W[0], atol=1e-3)
    with pytest.raises(ValueError, match="config.probe"):
        train.train_linear_probe(feats, y, y[:4], c, _tiny_config(probe="lbfgs"), seed)
