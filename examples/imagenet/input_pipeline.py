"""imagenet2012 through ``tfds.data_source`` + grain (no TensorFlow).

Training: Inception-style random resized crop to ``config.image_size`` and a
horizontal flip, then each member's policy (see
:mod:`examples.trainer.augment`). Evaluation: resize the short side to
``image_size / 0.875`` and take the central crop.
"""

from __future__ import annotations

import functools

from examples.trainer import augment, data


def get_sources(config):
    """``(train_source, eval_source)``; raises a clear error if not prepared."""
    return (
        data.tfds_source(config.dataset, config.train_split, config.data_dir),
        data.tfds_source(config.dataset, config.eval_split, config.data_dir),
    )


def train_base(config):
    return functools.partial(augment.random_resized_crop_flip, size=config.image_size)


def eval_transform(config):
    return functools.partial(augment.center_crop, size=config.image_size)


def image_shape(config):
    return (config.image_size, config.image_size, 3)
