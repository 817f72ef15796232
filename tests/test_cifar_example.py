"""Tests of the CIFAR example trainer (examples/cifar) on 8 fake CPU devices.

Every method runs 2 steps of ``train_and_evaluate`` on
``tfds.testing.mock_data`` (offline, no TensorFlow) with 2 members sharded
over the mesh's ``"members"`` axis; checkpoint + resume reproduces an
uninterrupted run bit for bit; a dataset that is not prepared names the
command that prepares it.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the examples are not part of the installed package
    sys.path.insert(0, str(ROOT))

import tensorflow_datasets as tfds  # noqa: E402

from examples.cifar import input_pipeline, train  # noqa: E402
from examples.cifar.configs import tiny  # noqa: E402
from examples.trainer import augment, data, loop, methods  # noqa: E402
from examples.trainer.metrics import MetricWriter  # noqa: E402

METHODS = (
    "sgd",
    "adamw",
    "lookahead",
    "lookaround",
    "papa",
    "wash",
    "sam",
    "usam",
    "asam",
    "ssam",
    "lookaround+ssam",
)


# Methods share their init and evaluation programs: compile those once.
pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")


def _run(config, workdir):
    with tfds.testing.mock_data(num_examples=16):
        return train.train_and_evaluate(config, str(workdir))


def _records(workdir) -> list[dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _members_close(tree) -> bool:
    """Whether member 0 and member 1 agree (to float32 rounding of ``p + (a - p)``)."""
    return all(
        np.allclose(x[0], x[1], rtol=1e-6, atol=1e-7)
        for x in jax.tree.leaves(jax.device_get(tree))
    )


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_two_steps_with_sharded_members(method, tmp_path):
    config = tiny.get_config()
    config.method = method
    config.papa.alpha = 0.0  # PAPA-all: a pull at step 2 makes the members equal
    config.papa.lr_scaled = False
    state, metrics = _run(config, tmp_path)

    assert int(state.step) == 2
    # Members (2) are split over the mesh's members axis (2 of the 8 devices' axes).
    for leaf in jax.tree.leaves(state.params):
        assert leaf.shape[0] == 2
        assert leaf.sharding.spec == jax.sharding.PartitionSpec("members")
        assert leaf.sharding.mesh.shape["members"] == 2
    chex.assert_tree_all_finite(state.params)
    for name in ("member_0", "member_1", "ensemble", "average"):
        # A fraction of the 16 mock evaluation records (none counted twice or lost).
        correct = metrics[f"eval/{name}/accuracy"] * 16
        assert correct == pytest.approx(round(correct), abs=1e-4)
        assert np.isfinite(metrics[f"eval/{name}/loss"])
    assert metrics["eval/member_mean/accuracy"] == pytest.approx(
        (metrics["eval/member_0/accuracy"] + metrics["eval/member_1/accuracy"]) / 2
    )

    parsed = methods.parse_method(method)
    if parsed.averaging in ("lookaround", "papa"):
        # Step 2 is a sync: members and their BatchNorm statistics coincide,
        # so every member and the logit ensemble score the same.
        assert _members_close(state.params)
        assert _members_close(state.model_state)
        assert metrics["eval/member_0/loss"] == pytest.approx(
            metrics["eval/ensemble/loss"]
        )
    elif parsed.averaging == "lookahead":
        # optax.lookahead resets the fast weights to the slow ones at step 2.
        chex.assert_trees_all_close(
            state.params.fast, state.params.slow, rtol=1e-6, atol=1e-7
        )
    else:
        assert not _members_close(state.params)  # independent (or shuffled) members

    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]  # one line per logged step
    assert "eval/average/accuracy" not in records[0]
    assert records[1]["eval/average/accuracy"] == metrics["eval/average/accuracy"]
    assert np.isfinite(records[1]["train/loss"])


def test_mock_data_flag_runs_offline_and_writes_tensorboard_scalars(
    tmp_path, read_scalars
):
    config = tiny.get_config()
    config.mock_data = True  # the flag alone: no tfds.testing.mock_data around the run
    state, metrics = train.train_and_evaluate(config, str(tmp_path))

    assert int(state.step) == 2
    for name in ("member_0", "member_1", "ensemble", "average"):
        # A fraction of the 16 mock evaluation records (max(16, batch_size 8)).
        correct = metrics[f"eval/{name}/accuracy"] * 16
        assert correct == pytest.approx(round(correct), abs=1e-4)
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    # Every metric of metrics.jsonl is a TensorBoard scalar of the same name,
    # at the same step, with the same value (to float32).
    scalars = read_scalars(tmp_path / "tensorboard")
    assert {
        "train/loss",
        "train/accuracy",
        "train/learning_rate",
        "train/steps_per_second",
        "eval/member_0/accuracy",
        "eval/ensemble/loss",
        "eval/average/accuracy",
        "eval/member_mean/accuracy",
    } <= set(scalars)
    logged = {(r["step"], k): v for r in records for k, v in r.items() if k != "step"}
    written = {(step, tag): v for tag, pts in scalars.items() for step, v in pts}
    assert set(written) == set(logged)
    for key, value in logged.items():
        assert written[key] == pytest.approx(value, rel=1e-6), key


def test_a_short_run_on_digits_learns_well_above_chance(tmp_path):
    from examples.cifar.configs import digits

    config = digits.get_config()  # ResNet 8-16-32 on scikit-learn's digits
    config.method = "adamw"
    config.num_members = 1
    config.optimizer.learning_rate = 0.01
    config.optimizer.schedule = "constant"
    config.optimizer.weight_decay = 0.0
    config.member_augment = ("crop_flip",)
    config.batch_size = 32
    config.num_train_steps = 40  # 1280 of the 1437 training records
    config.recalibration_batches = 2
    config.log_every_steps = 20
    config.progress_bar = False
    state, metrics = train.train_and_evaluate(config, str(tmp_path))

    assert int(state.step) == 40
    # 10 classes: chance is 0.1 on the 360 held-out digits. The weight
    # "average" of one member is that member with BatchNorm statistics
    # recalibrated on training batches; the member itself is evaluated with
    # its running statistics, which lag behind the fast-moving weights.
    assert metrics["eval/average/accuracy"] >= 0.5
    assert metrics["eval/member_0/accuracy"] >= 0.2
    losses = [r["train/loss"] for r in _records(tmp_path)]
    assert len(losses) == 2 and losses[1] < np.log(10) - 0.5


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path):
    def config(steps):
        c = tiny.get_config()
        c.method = "lookaround+sam"
        c.lookaround.sync_period = 3  # the sync (step 3) happens after the resume
        c.member_augment = ("randaugment", "autoaugment")
        c.optimizer.schedule = "constant"  # the same schedule for 2 and 4 steps
        c.num_train_steps = steps
        c.eval_every_steps = 100
        return c

    uninterrupted, _ = _run(config(4), tmp_path / "a")
    first, _ = _run(config(2), tmp_path / "b")
    resumed, _ = _run(
        config(4), tmp_path / "b"
    )  # restores step 2, data iterator included

    assert int(first.step) == 2 and int(resumed.step) == 4
    chex.assert_trees_all_equal(jax.device_get(resumed), jax.device_get(uninterrupted))
    assert not _members_close(first.params)


def _checkpoint_steps(workdir) -> list[str]:
    return sorted(os.listdir(pathlib.Path(workdir) / "checkpoints"))


def _sgd_config(steps, learning_rate=0.1):
    c = tiny.get_config()
    c.method = "sgd"
    c.optimizer.schedule = "constant"
    c.optimizer.learning_rate = learning_rate
    c.num_train_steps = steps
    c.checkpoint_every_steps = 1
    c.eval_every_steps = 100
    return c


def test_a_non_finite_state_stops_training_and_keeps_the_last_checkpoint(
    tmp_path, capsys
):
    # lr 1e30: step 1 moves the params to ~1e29, step 2 overflows them.
    config = _sgd_config(steps=4, learning_rate=1e30)
    with pytest.raises(loop.NonFiniteError) as error:
        _run(config, tmp_path)
    message = str(error.value)
    assert message.startswith("training stopped at step 2: non-finite params")
    assert "the last checkpoint, step 1 in" in message
    assert _checkpoint_steps(tmp_path) == ["1"]  # nothing of step 2 was saved
    assert [r["step"] for r in _records(tmp_path)] == [1]
    assert np.isfinite(_records(tmp_path)[0]["train/loss"])

    # The kept checkpoint restores, and holds a finite state (params ~1e29).
    state, _ = _run(_sgd_config(steps=1), tmp_path)
    assert "resumed from step 1" in capsys.readouterr().out
    assert int(state.step) == 1
    chex.assert_tree_all_finite(state)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(state.params)) > 1e20


def test_a_non_finite_loss_at_the_first_step_names_the_loss(tmp_path):
    config = _sgd_config(steps=2)
    config.label_smoothing = float("nan")  # NaN targets: a NaN loss at step 1
    with pytest.raises(loop.NonFiniteError) as error:
        _run(config, tmp_path)
    message = str(error.value)
    assert message.startswith("training stopped at step 1: non-finite train/loss")
    assert message.endswith("there is no checkpoint.")
    assert not os.listdir(tmp_path / "checkpoints")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A workdir after 2 steps with checkpoints at steps 1 and 2."""
    workdir = tmp_path_factory.mktemp("two_checkpoints")
    state, _ = _run(_sgd_config(steps=2), workdir)
    assert _checkpoint_steps(workdir) == ["1", "2"]
    return workdir, jax.device_get(state)


def _truncate_array_data(step_dir):
    files = list((step_dir / "state" / "d").iterdir())
    assert files  # orbax's OCDBT data files
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _remove_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def _garble_iterator_state(step_dir):
    (step_dir / "data" / "process_0-of-1.json").write_text('{"version": 2, "last_se')


@pytest.mark.parametrize(
    "corrupt", [_truncate_array_data, _remove_metadata, _garble_iterator_state]
)
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(
    corrupt, two_checkpoints, tmp_path, capsys
):
    source, state_2 = two_checkpoints
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    before = (workdir / "metrics.jsonl").read_text().splitlines()
    corrupt(workdir / "checkpoints" / "2")

    state, _ = _run(_sgd_config(steps=3), workdir)

    out = capsys.readouterr().out
    bad = workdir / "checkpoints" / "2"
    assert f"warning: checkpoint {bad} cannot be restored" in out
    assert "resumed from step 1" in out
    assert (workdir / "checkpoints_unreadable" / "2").is_dir()  # kept aside
    assert _checkpoint_steps(workdir) == ["2", "3"]  # step 2 saved again
    assert int(state.step) == 3
    # Step 2 was trained again from step 1's state and data position: its
    # train loss is the first run's, and the step is logged once.
    after = (workdir / "metrics.jsonl").read_text().splitlines()
    assert after[0] == before[0]  # appended: the kept line is untouched
    records = [json.loads(line) for line in after]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["train/loss"] == json.loads(before[1])["train/loss"]


def test_all_checkpoints_unreadable_raises_and_moves_nothing(two_checkpoints, tmp_path):
    source, _ = two_checkpoints
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    for step in ("1", "2"):
        _remove_metadata(workdir / "checkpoints" / step)
    with pytest.raises(RuntimeError, match=r"none of the checkpoints \[2, 1\]"):
        _run(_sgd_config(steps=3), workdir)
    assert _checkpoint_steps(workdir) == ["1", "2"]
    assert not (workdir / "checkpoints_unreadable").exists()


def test_metric_writer_appends_and_drops_steps_after_the_resumed_one(tmp_path):
    writer = MetricWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write(step, {"train/loss": step / 3})
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 6, "train/lo')  # a line cut off by a kill
    kept = path.read_text().splitlines()[:3]

    writer = MetricWriter(str(tmp_path))  # a run resumed from step 3
    writer.resume(3)
    assert path.read_text().splitlines() == kept
    writer.write(4, {"train/loss": 0.5})
    lines = path.read_text().splitlines()
    assert lines[:3] == kept
    assert json.loads(lines[3]) == {"step": 4, "train/loss": 0.5}
    assert [json.loads(line)["train/loss"] for line in kept] == [1 / 3, 2 / 3, 1.0]


def test_metric_writer_tensorboard_off_writes_only_metrics_jsonl(
    tmp_path, read_scalars
):
    on, off = tmp_path / "on", tmp_path / "off"
    for workdir, tensorboard in ((on, True), (off, False)):
        writer = MetricWriter(str(workdir), tensorboard=tensorboard)
        writer.write(7, {"train/loss": 0.25, "eval/average/accuracy": 0.5})
        writer.close()
        assert json.loads((workdir / "metrics.jsonl").read_text()) == {
            "step": 7,
            "train/loss": 0.25,
            "eval/average/accuracy": 0.5,
        }
    assert read_scalars(on / "tensorboard") == {
        "train/loss": [(7, 0.25)],
        "eval/average/accuracy": [(7, 0.5)],
    }
    assert not (off / "tensorboard").exists()


def _main(workdir, *flags, cache_dir, timeout=300):
    """``python -m examples.cifar.main`` with the tiny config on digits, in a new process."""
    env = dict(os.environ)  # the suite's 8 fake CPU devices
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    command = [
        sys.executable,
        "-m",
        "examples.cifar.main",
        f"--workdir={workdir}",
        "--config=examples/cifar/configs/tiny.py",
        "--config.dataset=digits",
        *flags,
    ]
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _final_params(workdir) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    step = max(int(s) for s in _checkpoint_steps(workdir))
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    restored = ocp.StandardCheckpointer().restore(path)
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def test_two_processes_with_one_seed_train_bit_for_bit_alike(tmp_path):
    # WASH shuffles with JAX keys, the members augment with grain's per-record
    # generators (crop_flip and AutoAugment): every source of randomness is seeded.
    flags = ("--config.method=wash", "--config.num_train_steps=3")
    runs = [_main(tmp_path / f"run{i}", *flags, cache_dir=tmp_path) for i in (0, 1)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]

    def losses(workdir):
        records = _records(workdir)
        assert [r["step"] for r in records] == [1, 2, 3]
        return [
            {k: v for k, v in r.items() if k != "train/steps_per_second"}
            for r in records
        ]

    assert losses(tmp_path / "run0") == losses(tmp_path / "run1")  # exact floats
    first, second = _final_params(tmp_path / "run0"), _final_params(tmp_path / "run1")
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()
    assert not np.array_equal(first[0][0], first[0][1])  # members differ


def test_main_exits_non_zero_naming_the_step_of_a_non_finite_state(tmp_path):
    run = _main(
        tmp_path / "run",
        "--config.method=sgd",
        "--config.optimizer.schedule=constant",
        "--config.optimizer.learning_rate=1e30",
        "--config.num_train_steps=4",
        "--config.checkpoint_every_steps=1",
        cache_dir=tmp_path,
    )
    assert run.returncode == 1
    assert "error: training stopped at step 2: non-finite params" in run.stderr
    assert _checkpoint_steps(tmp_path / "run") == ["1"]


def test_missing_dataset_names_the_preparation_command(tmp_path):
    config = tiny.get_config()
    config.data_dir = str(tmp_path / "tfds")
    with pytest.raises(data.DatasetNotPreparedError) as error:
        train.create_task(config)
    message = str(error.value)
    assert "tfds.data_source('cifar10', download=True" in message
    assert "tfds build cifar10 --file_format=array_record" in message
    assert not (tmp_path / "tfds").exists()  # nothing was downloaded


def test_main_names_the_preparation_command_and_exits_2(tmp_path):
    """An unprepared dataset: one line on stderr naming the command, exit 2."""
    run = _main(
        tmp_path / "run",
        "--config.dataset=cifar10",
        f"--config.data_dir={tmp_path / 'tfds'}",
        cache_dir=tmp_path / "cache",
    )
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "tfds build cifar10" in lines[-1]
    assert "Traceback" not in run.stderr


def test_digits_are_load_digits_upscaled_to_32x32x3():
    from sklearn.datasets import load_digits

    train_source, test_source = data.digits_sources(test_fraction=0.2, seed=0)
    assert len(train_source) + len(test_source) == 1797
    record = train_source[0]
    assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
    # Find the original 8x8 image and check the 4x pixel repetition and scale.
    digits = load_digits()
    small = record["image"][::4, ::4, 0]
    matches = np.flatnonzero(
        (np.rint(digits.images * 255 / 16).astype(np.uint8) == small).all(axis=(1, 2))
    )
    assert matches.size >= 1 and digits.target[matches[0]] == record["label"]
    np.testing.assert_array_equal(
        record["image"],
        np.kron(small, np.ones((4, 4), np.uint8))[..., None].repeat(3, -1),
    )


def test_member_views_apply_each_members_policy_reproducibly():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    base = input_pipeline.train_base(tiny.get_config())
    views = data.MemberViews(
        [augment.member_transform(p, base) for p in augment.POLICIES]
    )
    out = views.random_map({"image": image, "label": 3}, np.random.default_rng(1))
    again = views.random_map({"image": image, "label": 3}, np.random.default_rng(1))
    assert out["image"].shape == (3, 32, 32, 3) and out["label"] == 3
    np.testing.assert_array_equal(out["image"], again["image"])
    # crop_flip only moves pixels: its view is a shifted (maybe flipped) crop.
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    crops = [
        c
        for t in range(9)
        for l in range(9)
        for c in (
            padded[t : t + 32, l : l + 32],
            padded[t : t + 32, l : l + 32][:, ::-1],
        )
    ]
    assert any(np.array_equal(out["image"][0], c) for c in crops)


@pytest.mark.parametrize(
    "op",
    [
        "rotate",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
        "color",
        "contrast",
        "brightness",
        "sharpness",
        "posterize",
        "solarize",
        "identity",
    ],
)
def test_augmentation_ops_at_zero_magnitude_are_the_identity(op):
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(augment.OPS[op](image, 0.0), image)


def test_solarize_and_posterize_closed_forms():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    solarized = augment.solarize(image, 0.5)  # threshold 128
    np.testing.assert_array_equal(solarized, np.where(image >= 128, 255 - image, image))
    posterized = augment.posterize(image, 1.0)  # keep 4 bits
    np.testing.assert_array_equal(posterized, image & 0xF0)


def test_parse_method():
    assert methods.parse_method("lookaround+ssam") == methods.Method(
        "sgd", "lookaround", "ssam"
    )
    assert methods.parse_method("adamw") == methods.Method("adamw", "none", "none")


def test_parse_method_rejects_unknown_token():
    with pytest.raises(ValueError, match="unknown token 'swa'"):
        methods.parse_method("lookaround+swa")


def test_parse_method_rejects_two_averaging_methods():
    with pytest.raises(ValueError, match="two averaging choices"):
        methods.parse_method("lookaround+papa")


def test_execution_depth_order_follows_the_forward_pass_not_key_order():
    config = tiny.get_config()
    config.model.kwargs.stage_sizes = (11,)
    config.model.kwargs.widths = (4,)
    from examples.cifar import models

    fns = loop.ModelFns(lambda rngs: models.create_model(config, rngs))
    depth = loop.depth_order(fns, (32, 32, 3))
    ranks = {
        jax.tree_util.keystr(path): depth(path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(fns.abstract_params)[0]
    }
    rank = lambda prefix: min(r for p, r in ranks.items() if p.startswith(prefix))
    assert rank("['stem']") == 0
    assert rank("['blocks'][2]") < rank("['blocks'][10]")  # key order has 10 before 2
    assert max(ranks.values()) == rank("['head']") + 1  # head kernel and bias are last
    assert sorted(ranks.values()) == list(range(len(ranks)))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(config, name):
    """Abstract params and logits of one architecture (tracing only, no compile)."""
    from examples.cifar import models

    config.model.name = name
    config.model.kwargs = {}
    fns = loop.ModelFns(lambda rngs: models.create_model(config, rngs))
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)
    logits = jax.eval_shape(
        lambda p, s, x: fns.apply(p, s, x, train=True)[0],
        fns.abstract_params,
        fns.abstract_state,
        images,
    )
    return fns.abstract_params, logits


def test_cifar_resnet18_has_the_standard_parameter_count():
    # The CIFAR ResNet-18 (3x3 stem, projection shortcuts, BatchNorm scale and
    # bias, 10 classes) has 11,173,962 parameters.
    params, logits = _abstract(tiny.get_config(), "resnet18")
    assert _count(params) == 11_173_962
    assert logits.shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet20", "wrn16_8"])
def test_cifar_resnets_map_images_to_logits(name):
    _, logits = _abstract(tiny.get_config(), name)
    assert logits.shape == (2, 10) and logits.dtype == np.float32


def test_cifar_vit_parameter_count_matches_its_closed_form():
    d, depth, mlp, patch, classes = 256, 6, 512, 4, 10
    tokens = (32 // patch) ** 2
    block = (
        2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    )
    expected = (
        (3 * patch * patch * d + d)
        + tokens * d
        + depth * block
        + 2 * d
        + d * classes
        + classes
    )
    params, logits = _abstract(tiny.get_config(), "vit")
    assert _count(params) == expected
    assert logits.shape == (2, 10)
