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
