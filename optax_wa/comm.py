"""Communication accounting: bytes carried by collectives in compiled HLO.

A cheap, backend-independent way to check what a sharded step communicates:
compile it, read the optimized HLO and add up the collectives' buffers.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["collective_bytes"]

COLLECTIVE_KINDS = (
    "all-reduce",
    "all-gather",
    "all-to-all",
    "collective-permute",
    "reduce-scatter",
)

_DTYPE_BYTES = {
    "pred": 1,
    "s2": 1,
    "s4": 1,
    "s8": 1,
    "s16": 2,
    "s32": 4,
    "s64": 8,
    "u2": 1,
    "u4": 1,
    "u8": 1,
    "u16": 2,
    "u32": 4,
    "u64": 8,
    "f16": 2,
    "bf16": 2,
    "f32": 4,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*|f4\w*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_CALLED = re.compile(
    r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
    r"|branch_computations=\{([^}]*)\}"
)


def _array_bytes(text: str) -> int:
    """Total bytes of every array shape written in ``text``."""
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _DTYPE_BYTES:
            width = _DTYPE_BYTES[dtype]
        elif dtype.startswith(("f8", "f4")):
            width = 1
        else:
            continue
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * width
    return total


def _split_shape(rest: str) -> tuple[str, str]:
    """Splits ``"<shape> op(args), attrs"`` into the shape and the remainder."""
    if rest.startswith("("):
        depth = 0
        for i, char in enumerate(rest):
            depth += char == "("
            depth -= char == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    shape, _, remainder = rest.partition(" ")
    return shape, remainder


def _operands(remainder: str) -> str:
    """The text between the opcode's parentheses."""
    start = remainder.find("(")
    depth = 0
    for i in range(start, len(remainder)):
        depth += remainder[i] == "("
        depth -= remainder[i] == ")"
        if depth == 0:
            return remainder[start + 1 : i]
    return remainder[start + 1 :]


def _hlo_text(compiled: Any) -> str:
    if isinstance(compiled, str):
        if "HloModule" not in compiled:
            raise ValueError(
                "collective_bytes: a string must be HLO text (starting with "
                f"'HloModule'), got {compiled[:60]!r}."
            )
        return compiled
    if hasattr(compiled, "as_text"):
        text = compiled.as_text()
        if isinstance(text, str) and "HloModule" in text:
            return text
    raise ValueError(
        "collective_bytes: pass a compiled computation "
        "(``jax.jit(f).lower(*args).compile()``) or its HLO text; a lowered, "
        "not compiled, computation has no collectives yet."
    )


def _loop_computations(text: str) -> set[str]:
    """Names of the computations that run inside a ``while`` loop."""
    calls: dict[str, set[str]] = {}
    roots: set[str] = set()
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header["name"]
            calls.setdefault(current, set())
            continue
        if current is None:
            continue
        for single, several in _CALLED.findall(line):
            names = [single] if single else re.findall(r"%?([\w.\-]+)", several)
            calls[current].update(names)
        if " while(" in line:
            roots |= set(re.findall(r"(?:body|condition)=%?([\w.\-]+)", line))
    inside, stack = set(), list(roots)
    while stack:
        name = stack.pop()
        if name not in inside:
            inside.add(name)
            stack.extend(calls.get(name, ()))
    return inside


def collective_bytes(
    compiled: Any, *, by_kind: bool = False, in_loops: bool = True
) -> int | dict[str, int]:
    r"""Bytes carried by the collectives of a compiled computation, per device.

    Reads the optimized HLO and, for every ``all-reduce``, ``all-gather``,
    ``all-to-all``, ``collective-permute`` and ``reduce-scatter`` instruction
    (and their asynchronous ``-start`` forms), adds its *payload*:

    .. math::
      \text{payload} = \max(\text{operand bytes}, \text{result bytes}),

    the size of the larger buffer one device holds in the collective (the
    gathered array of an all-gather, the full input of a reduce-scatter, the
    array of an all-reduce). The HLO of an SPMD program is per device, so
    this is a per-device figure. On the wire, a ring all-reduce moves about
    twice its payload, an all-gather or all-to-all among :math:`D` devices
    :math:`(D - 1)/D` of it.

    Each instruction counts once: collectives in a conditional branch count
    as if that branch ran (a ``lax.cond`` sync step counts one sync), and
    those in a ``while`` body as one iteration, or not at all with
    ``in_loops=False`` (for loops that usually run zero times, such as the
    rare extra rounds of :func:`optax_wa.wash`).

    Args:
      compiled: ``jax.jit(f).lower(*args).compile()``, or HLO text.
      by_kind: if True, return ``{kind: bytes}`` for the five kinds instead of
        the total.
      in_loops: whether to count collectives inside ``while`` loops.

    Returns:
      The total payload in bytes, or the per-kind dictionary.

    Examples:
      >>> from optax_wa.comm import collective_bytes
      >>> hlo = '''HloModule m
      ... ENTRY %main (p: f32[1,12]) -> f32[8,12] {
      ...   %p = f32[1,12]{1,0} parameter(0)
      ...   ROOT %g = f32[8,12]{1,0} all-gather(%p), dimensions={0}
      ... }'''
      >>> collective_bytes(hlo)          # 8 * 12 float32 values
      384
    """
    text = _hlo_text(compiled)
    skipped = set() if in_loops else _loop_computations(text)
    shapes: dict[str, str] = {}
    found: list[tuple[str, str, str, bool]] = []
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header["name"]
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        shape, remainder = _split_shape(match["rest"])
        shapes[match["name"]] = shape
        opcode = remainder.split("(", 1)[0].strip()
        is_start = opcode.endswith("-start")
        kind = opcode[: -len("-start")] if is_start else opcode
        if kind in COLLECTIVE_KINDS and current not in skipped:
            found.append((kind, shape, _operands(remainder), is_start))

    totals = dict.fromkeys(COLLECTIVE_KINDS, 0)
    for kind, shape, operands, is_start in found:
        if _ARRAY.search(operands):  # operands printed with their shapes
            operand_bytes = _array_bytes(operands)
        else:
            operand_bytes = sum(
                _array_bytes(shapes.get(name, ""))
                for name in _OPERAND.findall(operands)
            )
        result_bytes = _array_bytes(shape)
        if is_start and shape.startswith("("):
            # An async start returns (operands..., results..., contexts): the
            # operand buffers are aliased, not moved.
            result_bytes = max(result_bytes - operand_bytes, 0)
        totals[kind] += max(operand_bytes, result_bytes)
    return totals if by_kind else sum(totals.values())
