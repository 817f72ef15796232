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
from examples.slimclr.configs import default  # noqa: E402

NUM_EXAMPLES = 16


def _tiny_config(**overrides):
    config = default.get_config()
    config.stage_sizes = (1,)
    config.num_filters = 8
    config.widths = (1.0, 0.5)
    config.projection_dim = 8
    config.batch_size = 8
    config.num_epochs = 2
    config.warmup_epochs = 1
    config.queue_size = 16
    config.probe_epochs = 1
    config.probe_batch_size = 8
    config.save_checkpoint = False
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
