"""MNIST-1D data, a small 1-D CNN (Flax NNX) and per-member augmentations.

Shared by the comparison job (``examples/compare.py``) and the benchmarks.
MNIST-1D is generated locally from the templates bundled with the ``mnist1d``
package (no download): 4000 training and 1000 test signals of length 40.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NUM_CLASSES = 10
SIGNAL_LENGTH = 40
NUM_AUGMENTATIONS = 3


@functools.lru_cache(maxsize=4)
def load_mnist1d(seed: int = 42) -> dict[str, np.ndarray]:
    """MNIST-1D generated locally; ``seed`` is the generator's seed."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)
    return {
        "x_train": np.asarray(data["x"], np.float32),
        "y_train": np.asarray(data["y"], np.int32),
        "x_test": np.asarray(data["x_test"], np.float32),
        "y_test": np.asarray(data["y_test"], np.int32),
    }


class CNN1D(nnx.Module):
    """Three 1-D convolutions and a linear classifier (about 16k parameters)."""

    def __init__(self, channels: int = 32, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, channels, kernel_size=(5,), rngs=rngs)
        self.conv2 = nnx.Conv(
            channels, channels, kernel_size=(5,), strides=(2,), rngs=rngs
        )
        self.conv3 = nnx.Conv(
            channels, channels, kernel_size=(5,), strides=(2,), rngs=rngs
        )
        self.head = nnx.Linear(channels * SIGNAL_LENGTH // 4, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        h = x[..., None]
        h = nnx.relu(self.conv1(h))
        h = nnx.relu(self.conv2(h))
        h = nnx.relu(self.conv3(h))
        return self.head(h.reshape(h.shape[0], -1))


def make_model(channels: int = 32):
    """Returns ``(init_fn, apply_fn)`` over pure parameter pytrees."""
    graphdef, _ = nnx.split(CNN1D(channels, rngs=nnx.Rngs(0)))

    def init_fn(key):
        model = CNN1D(channels, rngs=nnx.Rngs(params=key))
        return nnx.state(model, nnx.Param).to_pure_dict()

    def apply_fn(params, x):
        state = nnx.State(jax.tree.map(nnx.Param, params))
        return nnx.merge(graphdef, state)(x)

    return init_fn, apply_fn


def augment(x: jax.Array, key: jax.Array, kind: jax.Array) -> jax.Array:
    """Per-member augmentation of a batch of signals ``(B, 40)``.

    ``kind`` (an int, may be traced) picks one of three policies, so that
    members see different augmentations as Lookaround prescribes:
    0: random circular shift in [-3, 3]; 1: shift + Gaussian noise
    (sigma 0.1 of the signal scale); 2: shift + random amplitude in [0.8, 1.2].
    """
    k_shift, k_noise, k_scale = jax.random.split(key, 3)
    shifts = jax.random.randint(k_shift, (x.shape[0],), -3, 4)
    shifted = jax.vmap(jnp.roll)(x, shifts)
    noise = 0.1 * jnp.std(x) * jax.random.normal(k_noise, x.shape)
    scale = jax.random.uniform(k_scale, (x.shape[0], 1), minval=0.8, maxval=1.2)
    return jnp.select(
        [kind == 0, kind == 1], [shifted, shifted + noise], shifted * scale
    )


def cross_entropy(logits, labels):
    return -jnp.mean(
        jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)
    )


def accuracy(logits, labels) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)
