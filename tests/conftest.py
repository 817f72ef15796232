"""Test configuration: 8 fake CPU devices, set before JAX is imported."""

import os
import re

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

# The import above must come after XLA_FLAGS; fail loudly if JAX started early.
assert jax.device_count() == 8, (
    f"expected 8 fake CPU devices, got {jax.device_count()}: JAX was imported "
    "before tests/conftest.py could set XLA_FLAGS"
)


import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402


@pytest.fixture(scope="module")
def persistent_compilation_cache(tmp_path_factory):
    """A module-wide persistent compilation cache, so that programs the tests
    of a module share (trainer init, evaluation) compile once."""
    options = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    previous = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # earlier compiles may have initialized it
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def _read_scalars(logdir):
    """``{tag: [(step, value), ...]}`` of every TensorBoard event file under ``logdir``.

    Reads the TFRecord framing (length, its CRC, the ``Event`` proto, its
    CRC) directly and parses each record with tensorboardX's ``event_pb2``,
    so no TensorFlow or TensorBoard is needed.
    """
    import pathlib
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(pathlib.Path(logdir).rglob("events.out.tfevents.*"))
    assert files, f"no event file under {logdir}"
    for path in files:
        raw = path.read_bytes()
        offset = 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset : offset + 8])
            record = raw[offset + 12 : offset + 12 + length]
            assert len(record) == length, f"truncated record in {path}"
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(
                    (event.step, value.simple_value)
                )
    return scalars


@pytest.fixture
def read_scalars():
    """The reader of TensorBoard scalars, ``read_scalars(logdir) -> {tag: [(step, value)]}``."""
    return _read_scalars


def _hlo_computations(hlo, blank_names=False):
    """``{name: (result, body)}`` of every computation of a compiled program's
    HLO text (``name`` ``"ENTRY"`` for the entry), metadata removed; with
    ``blank_names``, instruction names blanked too (equal kernels, equal
    bodies)."""
    out = {}
    blocks = re.finditer(
        r"^(ENTRY )?%(\S+) \([^\n]*\) -> ([^\n]*) \{\n(.*?)^\}", hlo, re.M | re.S
    )
    for block in blocks:
        body = re.sub(r", metadata=\{.*?\}", "", block.group(4))
        if blank_names:
            body = re.sub(r"%[\w.-]+", "%", body)
        out["ENTRY" if block.group(1) else block.group(2)] = (block.group(3), body)
    return out


@pytest.fixture
def hlo_computations():
    """The parser of compiled HLO text, ``hlo_computations(text,
    blank_names=False) -> {name: (result type, body)}``."""
    return _hlo_computations


# The longest test files first (measured: `python -m pytest --durations=40`).
# pytest-xdist (`--dist loadfile`, pyproject.toml) hands whole files to the
# two workers in collection order, so a long file collected last runs alone
# while the other worker idles; longest first balances the two.
_LONGEST_FILES_FIRST = (
    "test_benchmarks.py",
    "test_cifar_example.py",
    "test_wash.py",
    "test_slimclr_example.py",
    "test_trainer_multiprocess.py",
    "test_doctests.py",
    "test_multiprocess.py",
    "test_map_members.py",
    "test_averaging.py",
    "test_nnx.py",
    "test_imagenet_example.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
