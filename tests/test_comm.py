"""Tests of optax_wa.comm.collective_bytes on collectives of known size."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_wa.comm import collective_bytes

D = 8  # devices
ROW = 24  # float32 values per device


def _compiled(fn):
    mesh = jax.make_mesh((D,), ("d",))
    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.ones((D, ROW)), NamedSharding(mesh, P("d")))
        mapped = jax.shard_map(
            fn, mesh=mesh, in_specs=P("d"), out_specs=P("d"), check_vma=False
        )
        return jax.jit(mapped).lower(x).compile()


# Payload: the larger of a collective's input and output buffers, per device.
CASES = {
    "all-reduce": (lambda b: lax.psum(b, "d"), ROW * 4),
    "all-gather": (lambda b: lax.all_gather(b, "d", tiled=True), D * ROW * 4),
    "all-to-all": (
        lambda b: lax.all_to_all(b.reshape(D, ROW // D), "d", 0, 0),
        ROW * 4,
    ),
    "collective-permute": (
        lambda b: lax.ppermute(b, "d", [(i, (i + 1) % D) for i in range(D)]),
        ROW * 4,
    ),
    "reduce-scatter": (
        lambda b: lax.psum_scatter(
            jnp.tile(b, (D, 1)), "d", scatter_dimension=0, tiled=True
        ),
        D * ROW * 4,
    ),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_known_collectives(kind):
    fn, expected = CASES[kind]
    by_kind = collective_bytes(_compiled(fn), by_kind=True)
    assert by_kind[kind] == expected
    assert sum(by_kind.values()) == expected


def test_no_collectives_is_zero():
    assert collective_bytes(_compiled(lambda b: 2.0 * b)) == 0


def test_collectives_in_while_loops_count_once_or_not_at_all():
    def looped(b):
        return lax.fori_loop(0, 3, lambda i, v: lax.psum(v, "d") / D, b)

    compiled = _compiled(lambda b: lax.psum(looped(b), "d"))
    assert collective_bytes(compiled) == 2 * ROW * 4
    assert collective_bytes(compiled, in_loops=False) == ROW * 4


def test_hlo_text_with_printed_operand_shapes():
    hlo = """HloModule m
ENTRY %main (p: bf16[2,3]) -> bf16[16,3] {
  %p = bf16[2,3]{1,0} parameter(0)
  %ag = bf16[16,3]{1,0} all-gather(bf16[2,3]{1,0} %p), dimensions={0}
  ROOT %ar = bf16[16,3]{1,0} all-reduce(bf16[16,3]{1,0} %ag), to_apply=%add
}"""
    assert collective_bytes(hlo, by_kind=True) == {
        "all-reduce": 16 * 3 * 2,
        "all-gather": 16 * 3 * 2,
        "all-to-all": 0,
        "collective-permute": 0,
        "reduce-scatter": 0,
    }


def test_async_start_counts_the_moved_buffer_once():
    hlo = """HloModule m
ENTRY %main (p: f32[4]) -> f32[32] {
  %p = f32[4]{0} parameter(0)
  %s = (f32[4]{0}, f32[32]{0}) all-gather-start(%p), dimensions={0}
  ROOT %d = f32[32]{0} all-gather-done(%s)
}"""
    assert collective_bytes(hlo) == 32 * 4


def test_lowered_but_not_compiled_is_rejected():
    lowered = jax.jit(lambda x: x + 1).lower(jnp.ones(3))
    with pytest.raises(ValueError, match="compiled"):
        collective_bytes(lowered)


@pytest.mark.parametrize("bad", ["garbage", "", 3, None])
def test_not_hlo_is_rejected(bad):
    with pytest.raises(ValueError, match="collective_bytes"):
        collective_bytes(bad)
