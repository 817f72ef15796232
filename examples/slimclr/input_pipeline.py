"""Data for the SlimCLR example: MNIST-1D (embedded) or CIFAR (tfds + grain).

* ``mnist1d``: generated locally from the templates bundled with the
  ``mnist1d`` package (:func:`examples.mnist1d_setup.load_mnist1d`; no
  download): 4000 training and 1000 test signals of length 40.
* ``cifar10`` / ``cifar100``: read once with ``tfds.data_source`` (the
  array_record files, no TensorFlow) through a ``grain.MapDataset`` into
  host memory (150 MB of uint8 for CIFAR-10). A dataset that is not prepared
  raises :class:`examples.trainer.data.DatasetNotPreparedError` naming the
  command that prepares it.

Both are then served as shuffled index batches of in-memory arrays, and the
two contrastive views are drawn on the device inside the jitted train step
(:func:`augment`), so the host does no per-example work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np

from examples.trainer import data as trainer_data

NUM_CLASSES = {"mnist1d": 10, "cifar10": 10, "cifar100": 100}
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """In-memory training and test arrays.

    Attributes:
      kind: ``"signal"`` (``x: (N, L)`` float32) or ``"image"`` (``x: (N, H,
        W, C)`` uint8).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    kind: str


def _read_all(source, limit: int | None, batch_size: int = 1024):
    """All (or the first ``limit``) records of a random-access source, via grain."""
    n = len(source) if limit is None else min(limit, len(source))
    dataset = (
        grain.MapDataset.source(source)[:n]
        .map(
            lambda r: (
                np.asarray(r["image"], np.uint8),
                np.asarray(r["label"], np.int32),
            )
        )
        .batch(batch_size)
    )
    images, labels = zip(*dataset)
    return np.concatenate(images), np.concatenate(labels)


def load(config) -> Dataset:
    """The dataset named by ``config.dataset``."""
    if config.dataset not in NUM_CLASSES:
        raise ValueError(
            f"config.dataset must be one of {sorted(NUM_CLASSES)}, got {config.dataset!r}."
        )
    if config.dataset == "mnist1d":
        from examples.mnist1d_setup import load_mnist1d

        d = load_mnist1d(config.data_seed)
        return Dataset(
            d["x_train"], d["y_train"], d["x_test"], d["y_test"], 10, "signal"
        )
    train = trainer_data.tfds_source(
        config.dataset, config.train_split, config.data_dir
    )
    test = trainer_data.tfds_source(config.dataset, config.eval_split, config.data_dir)
    x_train, y_train = _read_all(train, config.get("max_train_examples"))
    x_test, y_test = _read_all(test, config.get("max_eval_examples"))
    return Dataset(
        x_train, y_train, x_test, y_test, NUM_CLASSES[config.dataset], "image"
    )


def epoch_indices(
    n: int, batch_size: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Shuffled index batches of one epoch (the last partial batch is dropped)."""
    if batch_size > n:
        raise ValueError(f"batch_size ({batch_size}) exceeds the dataset size ({n}).")
    order = rng.permutation(n)
    for i in range(n // batch_size):
        yield order[i * batch_size : (i + 1) * batch_size]


# ----------------------------------------------------------------------------
# Augmentations (on device, inside the jitted step)


def preprocess(x: jax.Array, kind: str) -> jax.Array:
    """Float32 network input without augmentation (for the probe)."""
    if kind == "signal":
        return x.astype(jnp.float32)
    return (x.astype(jnp.float32) / 255.0 - CIFAR_MEAN) / CIFAR_STD


def _augment_signal(key, x, cfg):
    """One view of a signal ``(L,)``: random crop + resize, amplitude, trend, noise.

    The crop keeps a window of ``U(cfg.min_crop, 1)`` of the length at a
    random offset and resamples it to ``L`` points (linear interpolation): a
    random translation and stretch, as in MNIST-1D's own generator.
    """
    k_scale, k_offset, k_amp, k_trend, k_noise = jax.random.split(key, 5)
    length = x.shape[0]
    scale = jax.random.uniform(k_scale, (), minval=cfg.min_crop, maxval=1.0)
    offset = jax.random.uniform(k_offset, (), maxval=1.0 - scale)
    grid = jnp.linspace(0.0, 1.0, length)
    pos = (offset + scale * grid) * (length - 1)
    y = jnp.interp(pos, jnp.arange(length, dtype=jnp.float32), x)
    y = y * jax.random.uniform(
        k_amp, (), minval=1.0 - cfg.amplitude, maxval=1.0 + cfg.amplitude
    )
    y = y + cfg.trend * jax.random.normal(k_trend, ()) * (grid - 0.5)
    return y + cfg.noise * jax.random.normal(k_noise, (length,))


def _gray(image):
    return (image @ jnp.array([0.299, 0.587, 0.114]))[..., None]


def _augment_image(key, image, cfg):
    """One SimCLR view of an image ``(H, W, 3)`` in [0, 1].

    Random resized crop (area ``U(cfg.min_crop, 1)``, aspect ratio in [3/4,
    4/3]) with bilinear resampling, horizontal flip, colour jitter
    (brightness, contrast, saturation; probability 0.8) and grayscale
    (probability 0.2).
    """
    keys = jax.random.split(key, 9)
    h, w = image.shape[:2]
    area = jax.random.uniform(keys[0], (), minval=cfg.min_crop, maxval=1.0)
    log_ratio = jax.random.uniform(
        keys[1], (), minval=jnp.log(3 / 4), maxval=jnp.log(4 / 3)
    )
    ratio = jnp.exp(log_ratio)
    ch = jnp.clip(jnp.sqrt(area / ratio), 0.1, 1.0) * h
    cw = jnp.clip(jnp.sqrt(area * ratio), 0.1, 1.0) * w
    y0 = jax.random.uniform(keys[2], ()) * (h - ch)
    x0 = jax.random.uniform(keys[3], ()) * (w - cw)
    scale = jnp.stack([h / ch, w / cw])
    image = jax.image.scale_and_translate(
        image, image.shape, (0, 1), scale, -jnp.stack([y0, x0]) * scale, method="linear"
    )
    image = jnp.where(jax.random.bernoulli(keys[4]), image[:, ::-1], image)
    s = cfg.color_jitter
    b, c, sat = jax.random.uniform(keys[5], (3,), minval=1.0 - s, maxval=1.0 + s)
    jittered = jnp.clip(image * b, 0.0, 1.0)
    jittered = jnp.clip((jittered - jittered.mean()) * c + jittered.mean(), 0.0, 1.0)
    jittered = jnp.clip((jittered - _gray(jittered)) * sat + _gray(jittered), 0.0, 1.0)
    image = jnp.where(jax.random.bernoulli(keys[6], 0.8), jittered, image)
    image = jnp.where(
        jax.random.bernoulli(keys[7], 0.2),
        jnp.broadcast_to(_gray(image), image.shape),
        image,
    )
    return image


def augment(key: jax.Array, x: jax.Array, kind: str, cfg) -> jax.Array:
    """A batch of independently augmented views, ready for the network."""
    keys = jax.random.split(key, x.shape[0])
    if kind == "signal":
        return jax.vmap(lambda k, xi: _augment_signal(k, xi, cfg))(
            keys, x.astype(jnp.float32)
        )
    images = jax.vmap(lambda k, xi: _augment_image(k, xi, cfg))(
        keys, x.astype(jnp.float32) / 255.0
    )
    return (images - CIFAR_MEAN) / CIFAR_STD
