"""Input pipelines: ``tfds.data_source`` + grain, per-process sharding, no TensorFlow.

Example code, not library API.

Training batches come from a checkpointable ``grain.DataLoader`` sharded
over processes (``jax.process_index()`` of ``jax.process_count()``): each
process reads its block of every global batch, and the global batch is the
one a single process reads. Every record is turned into ``M`` member views,
one per member, each by that member's augmentation policy (Lookaround's
per-member augmentation), so a host batch holds
``image: (B_local, M, H, W, 3) uint8`` and ``label: (B_local,)``.

Evaluation and BatchNorm-recalibration batches are plain ``grain.MapDataset``
pipelines over this process's slice of the records, padded to a fixed number
of batches with a ``mask``.

``config.mock_data = True`` (:func:`mock_data`) replaces every TFDS dataset
by ``tfds.testing.mock_data``'s random records of the right shapes and
types: the whole trainer runs offline, nothing prepared, as the tests run it.

Host batches become global ``jax.Array``s with
``jax.make_array_from_process_local_data``; the mesh is built so that each
process holds a contiguous block of the data axis (see
:func:`examples.trainer.loop.make_mesh`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is not on disk in the array_record format."""


def prepare_command(name: str, data_dir: str | None = None) -> str:
    """The shell command that prepares ``name`` for ``tfds.data_source``."""
    target = f", data_dir={data_dir!r}" if data_dir else ""
    if name.startswith("imagenet2012"):
        return (
            "place ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a manual "
            f"directory, then run: tfds build {name} --file_format=array_record "
            "--manual_dir=/path/to/manual_dir"
            + (f" --data_dir={data_dir}" if data_dir else "")
        )
    return (
        'python -c "import tensorflow_datasets as tfds; '
        f'tfds.data_source({name!r}, download=True{target})"  '
        f"(or: tfds build {name} --file_format=array_record"
        + (f" --data_dir={data_dir}" if data_dir else "")
        + ")"
    )


def tfds_source(name: str, split: str, data_dir: str | None = None):
    """``tfds.data_source(name, split=split)`` without downloading.

    Raises:
      DatasetNotPreparedError: naming the command that prepares the dataset,
        when it is not on disk (in the random-access array_record format).
    """
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (FileNotFoundError, NotImplementedError, AssertionError, ValueError) as e:
        raise DatasetNotPreparedError(
            f"dataset {name!r} (split {split!r}) is not prepared for random access"
            f"{' in ' + data_dir if data_dir else ''}; prepare it with: "
            f"{prepare_command(name, data_dir)}"
        ) from e  # the original error stays attached as the cause


def mock_data(config, policy: str = "auto") -> contextlib.AbstractContextManager:
    """``tfds.testing.mock_data`` while ``config.mock_data`` is set, else nothing.

    Inside it every ``tfds.data_source`` call gives random records with the
    dataset's features (images of its shapes, labels in range), offline, in
    each split ``max(16, config.batch_size)`` records: enough for a tiny
    config's run, evaluation and recalibration. Learning on them is noise:
    it checks that a config runs, not what it reaches. The patch lives in
    this process, so the training loader runs without grain workers then.

    Args:
      config: the trainer config (``config.mock_data``, ``config.batch_size``).
      policy: ``"auto"`` (``MockPolicy.AUTO``: the dataset's metadata when
        installed, else its code) or ``"code"`` (``MockPolicy.USE_CODE``).
    """
    if not config.get("mock_data", False):
        return contextlib.nullcontext()
    import tensorflow_datasets as tfds

    policies = {
        "auto": tfds.testing.MockPolicy.AUTO,
        "code": tfds.testing.MockPolicy.USE_CODE,
    }
    return tfds.testing.mock_data(
        num_examples=max(16, int(config.batch_size)), policy=policies[policy]
    )


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A random-access source over in-memory arrays (grain accepts any sequence)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index]}


def digits_sources(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[ArraySource, ArraySource]:
    """``sklearn.datasets.load_digits`` as 32x32x3 uint8 images (train, test).

    The 8x8 images (values 0..16) are scaled to 0..255, upsampled 4x by
    pixel repetition and repeated over three channels; a fixed permutation
    splits them.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = images.repeat(4, axis=1).repeat(4, axis=2)[..., None].repeat(3, axis=-1)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    num_test = int(round(len(labels) * test_fraction))
    test, train = order[:num_test], order[num_test:]
    return ArraySource(images[train], labels[train]), ArraySource(
        images[test], labels[test]
    )


class MemberViews(grain.transforms.RandomMap):
    """A record -> ``M`` augmented views (one per member) and its label."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def random_map(self, element, rng: np.random.Generator):
        image = np.asarray(element["image"])
        views = np.stack([np.ascontiguousarray(t(image, rng)) for t in self.transforms])
        return {"image": views, "label": np.int32(element["label"])}


def local_batch_size(global_batch: int) -> int:
    count = jax.process_count()
    if global_batch % count:
        raise ValueError(
            f"the global batch size {global_batch} is not divisible by the {count} processes."
        )
    return global_batch // count


class ProcessBlockSampler:
    """Orders a sampler so that process ``i``'s reads form block ``i`` of every global batch.

    A ``grain.DataLoader`` sharded with ``ShardOptions(shard_index=i,
    shard_count=n)`` reads the sampler's positions ``i, i + n, i + 2n, ...``.
    This sampler maps those reads onto the global stream of ``sampler`` so
    that process ``i``'s ``k``-th local batch is the ``i``-th contiguous block
    of ``global_batch / n`` records of the ``k``-th global batch: the global
    batch (records, their order and their per-record random generators) is
    the one a single process reads, whatever ``n``. With ``n = 1`` it is
    ``sampler`` itself.
    """

    def __init__(self, sampler, global_batch: int, shard_count: int):
        if global_batch % shard_count:
            raise ValueError(
                f"the global batch size {global_batch} is not divisible by the "
                f"{shard_count} processes."
            )
        self.sampler = sampler
        self.global_batch = global_batch
        self.shard_count = shard_count
        self.local_batch = global_batch // shard_count

    def __len__(self) -> int:
        return len(self.sampler)

    def __repr__(self) -> str:  # grain checks it against a checkpoint's
        return (
            f"ProcessBlockSampler({self.sampler!r}, global_batch={self.global_batch}, "
            f"shard_count={self.shard_count})"
        )

    def __getitem__(self, index: int):
        local, shard = divmod(index, self.shard_count)
        batch, offset = divmod(local, self.local_batch)
        return self.sampler[
            batch * self.global_batch + shard * self.local_batch + offset
        ]


def train_loader(
    source,
    member_transforms: Sequence[Callable],
    *,
    global_batch: int,
    seed: int,
    worker_count: int = 0,
) -> grain.DataLoader:
    """An endless, shuffled (reshuffled every epoch), per-process sharded loader.

    One global shuffle (``seed``) orders the records; process ``i`` of ``n``
    (``grain.sharding.ShardByJaxProcess``) loads and augments its contiguous
    ``global_batch / n`` records of every global batch (see
    :class:`ProcessBlockSampler`), so the global batch is the same for any
    number of processes.
    """
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shuffle=True, num_epochs=None, seed=seed
    )
    return grain.DataLoader(
        data_source=source,
        sampler=ProcessBlockSampler(sampler, global_batch, shard_options.shard_count),
        operations=[
            MemberViews(member_transforms),
            grain.transforms.Batch(local_batch_size(global_batch), drop_remainder=True),
        ],
        worker_count=worker_count,
        shard_options=shard_options,
    )


def _padded_batches(
    dataset, batch: int, num_batches: int, image_shape
) -> Iterator[dict]:
    """Batches of ``dataset`` padded (``mask`` 0) up to ``num_batches`` batches."""
    it = iter(dataset.batch(batch, drop_remainder=False))
    for _ in range(num_batches):
        chunk = next(it, None)
        n = 0 if chunk is None else len(chunk["label"])
        images = np.zeros((batch, *image_shape), np.uint8)
        labels = np.zeros(batch, np.int32)
        if n:
            images[:n], labels[:n] = chunk["image"], chunk["label"]
        yield {
            "image": images,
            "label": labels,
            "mask": (np.arange(batch) < n).astype(np.float32),
        }


def eval_batches(
    source, transform: Callable, *, global_batch: int, image_shape: tuple[int, ...]
) -> Iterator[dict]:
    """Every record once: this process's records in padded, masked batches."""
    batch = local_batch_size(global_batch)
    index, count = jax.process_index(), jax.process_count()
    per_process = -(-len(source) // count)
    num_batches = -(-per_process // batch)
    dataset = grain.MapDataset.source(source)[index::count].map(
        lambda r: {
            "image": transform(np.asarray(r["image"])),
            "label": np.int32(r["label"]),
        }
    )
    return _padded_batches(dataset, batch, num_batches, tuple(image_shape))


def recalibration_batches(
    source, transform: Callable, *, global_batch: int, num_batches: int, seed: int
) -> Iterator[np.ndarray]:
    """``num_batches`` full batches of a fixed shuffle of ``source`` (images only)."""
    batch = local_batch_size(global_batch)
    dataset = (
        grain.MapDataset.source(source)
        .shuffle(seed=seed)[jax.process_index() :: jax.process_count()]
        .repeat()
        .map(lambda r: transform(np.asarray(r["image"])))
        .batch(batch, drop_remainder=True)
    )
    for i in range(num_batches):
        yield dataset[i]


def to_global(mesh, array: np.ndarray, spec: P) -> jax.Array:
    """A process-local batch -> the global array, sharded as ``spec``.

    The axis that ``spec`` maps to ``"data"`` is the one split over processes.
    """
    shape = list(array.shape)
    axis = list(spec).index("data")
    shape[axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(
        NamedSharding(mesh, spec), np.asarray(array), tuple(shape)
    )
