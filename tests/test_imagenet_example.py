"""Tests of the ImageNet ViT trainer (examples/imagenet) on 8 fake CPU devices.

One step of the tiny config (ViT of width 16, bfloat16 computation, mixup,
AdamW members of Lookaround with RandAugment views) on
``tfds.testing.mock_data`` imagenet2012 records of random sizes.
"""

from __future__ import annotations

import json
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the examples are not part of the installed package
    sys.path.insert(0, str(ROOT))


from examples.imagenet import train  # noqa: E402
from examples.imagenet.configs import default, tiny  # noqa: E402
from examples.trainer import augment, data  # noqa: E402


def test_imagenet_trainer_runs_one_step_with_sharded_members(tmp_path, read_scalars):
    config = tiny.get_config()
    # The flag alone: tfds.testing.mock_data records, max(16, batch_size 8) per split.
    config.mock_data = True
    state, metrics = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 1
    for leaf in jax.tree.leaves(state.params):
        assert leaf.dtype == jnp.float32  # bfloat16 computation, float32 params
        assert leaf.sharding.spec == jax.sharding.PartitionSpec("members")
        assert leaf.sharding.mesh.shape == {"members": 2, "data": 4}
    chex.assert_tree_all_finite(state.params)
    assert jax.tree.leaves(state.model_state) == []  # the ViT has no BatchNorm
    for name in ("member_0", "member_1", "ensemble", "average"):
        # A fraction of the 16 mock evaluation records (none counted twice or lost).
        correct = metrics[f"eval/{name}/accuracy"] * 16
        assert correct == pytest.approx(round(correct), abs=1e-4)
        assert np.isfinite(metrics[f"eval/{name}/loss"])
    assert metrics["eval/member_mean/accuracy"] == pytest.approx(
        (metrics["eval/member_0/accuracy"] + metrics["eval/member_1/accuracy"]) / 2
    )
    records = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1]  # train and evaluation in one line
    assert records[0]["eval/ensemble/loss"] == metrics["eval/ensemble/loss"]
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["eval/ensemble/loss"] == [
        (1, pytest.approx(metrics["eval/ensemble/loss"], rel=1e-6))
    ]
    assert [step for step, _ in scalars["train/loss"]] == [1]
    # Step 1 is not a Lookaround sync (period 5): members that started from one
    # point moved apart (each trained on its own RandAugment views).
    params = jax.device_get(state.params)
    assert any(not np.allclose(x[0], x[1]) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("shape", [(10, 25, 3), (47, 17, 3), (300, 200, 3)])
def test_imagenet_transforms_give_the_configured_size(shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    rng = np.random.default_rng(1)
    crop = augment.random_resized_crop_flip(image, rng, size=32)
    center = augment.center_crop(image, size=32)
    assert crop.shape == center.shape == (32, 32, 3)
    assert crop.dtype == center.dtype == np.uint8


def test_center_crop_of_an_exact_size_image_is_its_centre():
    # Short side 37 -> round(32 / 0.875 = 36.57) = 37: no resize, the central 32x32.
    image = np.random.default_rng(0).integers(0, 256, (37, 37, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        augment.center_crop(image, size=32), image[2:34, 2:34]
    )


def test_missing_imagenet_names_the_manual_preparation(tmp_path):
    config = default.get_config()
    config.data_dir = str(tmp_path / "tfds")
    with pytest.raises(data.DatasetNotPreparedError, match="--manual_dir"):
        train.create_task(config)
