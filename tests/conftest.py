"""Test configuration: 8 fake CPU devices, set before JAX is imported."""

import os

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
