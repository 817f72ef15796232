"""Bytes WASH moves per step on 8 devices: the compiled HLO counted by hand.

WASH at ``p = 0.01`` on 8 members with ResNet-20's parameter shapes, the
member axis split over 8 devices. The first round runs straight-line in the
entry computation: a 4-byte ``pmin`` and one ``all_to_all`` of
``8 x capacity`` float32 slots, where ``capacity`` is the Bernstein bound on
``Binomial(k, 1/8)`` for the ``k = p d`` expected selected values,
exceeded with probability ``1e-9``. The rare extra rounds run the same
exchange in a ``while`` loop. The hand count below reads the HLO text with
its own parsing and the capacity with its own closed form, and
``optax_wa.comm.collective_bytes`` must agree with it.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_wa
from optax_wa.comm import collective_bytes

M = 8


def _resnet20_shapes():
    shapes = [(3, 3, 3, 16), (16,), (16,)]
    in_ch = 16
    for ch in (16, 32, 64):
        for _ in range(3):
            shapes += [(3, 3, in_ch, ch), (3, 3, ch, ch)] + [(ch,)] * 4
            if in_ch != ch:
                shapes.append((1, 1, in_ch, ch))
            in_ch = ch
    return shapes + [(64, 10), (10,)]


def _capacity(mean: float, tail: float = 1e-9) -> int:
    """Smallest b with Bernstein's P(X - mean >= b - mean) <= tail."""
    log_inv = math.log(1 / tail)
    t = log_inv / 3 + math.sqrt((log_inv / 3) ** 2 + 2 * mean * log_inv)
    return math.ceil(mean + t)


def _computations(text: str) -> dict[str, list[str]]:
    comps, current = {}, None
    for line in text.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if header:
            current = header.group(2) if not header.group(1) else "ENTRY"
            comps[current] = []
        elif current is not None:
            comps[current].append(line)
    return comps


def _hand_count(lines, opcode):
    """Bytes of every ``opcode`` result in ``lines``, from its printed shape."""
    found = []
    for line in lines:
        if f" {opcode}(" not in line:
            continue
        shape = line.split("=", 1)[1].split(f" {opcode}(")[0]
        total = 0
        for dims in re.findall(r"(?:f32|s32)\[([\d,]*)\]", shape):
            total += 4 * int(np.prod([int(d) for d in dims.split(",") if d]))
        found.append(total)
    return found


def test_wash_bytes_per_step_match_a_hand_count_of_the_hlo():
    shapes = _resnet20_shapes()
    size = sum(int(np.prod(s)) for s in shapes)
    assert size == 272_282
    rng = np.random.default_rng(0)
    params = {
        f"p{i:02d}": rng.normal(size=(M, *s)).astype(np.float32)
        for i, s in enumerate(shapes)
    }
    mesh = jax.make_mesh((M,), ("members",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        params = jax.device_put(params, NamedSharding(mesh, P("members")))
        opt = optax_wa.wash(
            optax.sgd(0.1, momentum=0.9),
            shuffle_prob=0.01,
            layer_probs="constant",
            seed=0,
        )
        state = jax.jit(opt.init)(params)
        compiled = jax.jit(opt.update).lower(params, state, params).compile()

    capacity = _capacity(0.01 * size / M)
    assert capacity == 467
    exchange = M * capacity * 4  # 8 receivers x capacity float32 slots
    assert exchange == 14_944

    comps = _computations(compiled.as_text())
    bodies = set()
    for line in comps["ENTRY"]:
        bodies.update(re.findall(r"body=%?([\w.\-]+)", line))
    assert len(bodies) == 1
    (body,) = bodies
    # The common path: the entry computation itself.
    assert _hand_count(comps["ENTRY"], "all-to-all") == [exchange]
    assert _hand_count(comps["ENTRY"], "all-reduce") == [4]  # the s32 pmin
    # One extra round: the loop body, the same exchange again.
    assert _hand_count(comps[body], "all-to-all") == [exchange]
    assert _hand_count(comps[body], "all-reduce") == [4]
    others = [name for name in comps if name not in ("ENTRY", body)]
    for name in others:
        assert not _hand_count(comps[name], "all-to-all"), name

    common = collective_bytes(compiled, by_kind=True, in_loops=False)
    assert common["all-to-all"] == exchange and common["all-reduce"] == 4
    assert sum(common.values()) == exchange + 4 == 14_948
    # Worst case with one extra round: twice the common path.
    assert collective_bytes(compiled) == 2 * (exchange + 4)
