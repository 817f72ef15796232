"""CIFAR-10/100 (``tfds.data_source``) and embedded digits sources and transforms.

Training records go through :func:`examples.trainer.data.train_loader`
(grain, per-process sharding, one augmented view per member); see
:mod:`examples.trainer.augment` for the member policies built on
:func:`train_base` (4-pixel reflect pad, random 32x32 crop, horizontal flip).
"""

from __future__ import annotations

import functools

from examples.trainer import augment, data

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10}


def get_sources(config):
    """``(train_source, eval_source)`` for ``config.dataset``.

    ``"digits"`` is ``sklearn.datasets.load_digits`` upscaled to 32x32x3
    (bundled with scikit-learn: no download); ``"cifar10"``/``"cifar100"``
    read the prepared TFDS array_record files and raise
    :class:`examples.trainer.data.DatasetNotPreparedError` naming the
    preparation command when they are missing.
    """
    if config.dataset not in NUM_CLASSES:
        raise ValueError(
            f"config.dataset must be one of {sorted(NUM_CLASSES)}, got {config.dataset!r}."
        )
    if config.num_classes != NUM_CLASSES[config.dataset]:
        raise ValueError(
            f"config.num_classes={config.num_classes} but {config.dataset} has "
            f"{NUM_CLASSES[config.dataset]} classes."
        )
    if config.dataset == "digits":
        return data.digits_sources(seed=config.seed)
    return (
        data.tfds_source(config.dataset, config.train_split, config.data_dir),
        data.tfds_source(config.dataset, config.eval_split, config.data_dir),
    )


def train_base(config):
    """4-pixel reflect pad, random 32x32 crop, horizontal flip if ``config.random_flip``."""
    return functools.partial(augment.pad_crop_flip, padding=4, flip=config.random_flip)


def eval_transform(config):
    """Evaluation images are used as they are."""
    return lambda image: image


def image_shape(config):
    return (32, 32, 3)
