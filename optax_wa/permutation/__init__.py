r"""Permutation symmetry of hidden units: specs, spec builders and matching.

A network computes the same function after its hidden units are permuted,
provided every array that reads or writes those units is permuted the same
way. A :class:`PermutationSpec` records, for every leaf of a parameter tree,
which *permutation group* acts on each of its axes; a *permutation* is a dict
``{group: indices}``; :func:`apply_permutation` applies one
(:mod:`~optax_wa.permutation.spec`).

Trees. Specs name leaves by their path with ``/`` between keys
(``"layers/0/kernel"``, see :func:`named_leaves`), so the same spec serves a
pure dict, an ``nnx.State`` and any sub-tree of them. The recommended form is
the pure dict of a Flax NNX model's parameters and batch statistics::

    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)).to_pure_dict()

The builders (:func:`mlp_spec`, :func:`conv_spec`, :func:`resnet_spec`,
:func:`vit_block_spec`, in :mod:`~optax_wa.permutation.builders`) take the
model (or such a tree) and return a spec over every leaf of it.

Matching (:mod:`~optax_wa.permutation.matching`). :func:`weight_matching` and
:func:`gradient_matching` maximise :math:`\sum_k \langle a_k, \pi(b_k)\rangle`
over permutations by coordinate descent over the groups, one linear
assignment problem per group (Ainsworth et al., 2023); the objective never
decreases.
"""

from optax_wa.permutation._axes import SubAxes, named_leaves
from optax_wa.permutation.builders import (
    conv_spec,
    mlp_spec,
    resnet_spec,
    vit_block_spec,
)
from optax_wa.permutation.matching import (
    MatchingOptions,
    MatchResult,
    gradient_matching,
    matching_objective,
    weight_matching,
)
from optax_wa.permutation.spec import (
    PermutationSpec,
    apply_permutation,
    compose,
    identity_permutation,
    invert,
    random_permutation,
    validate,
)

__all__ = [
    "MatchResult",
    "MatchingOptions",
    "PermutationSpec",
    "SubAxes",
    "apply_permutation",
    "compose",
    "conv_spec",
    "gradient_matching",
    "identity_permutation",
    "invert",
    "matching_objective",
    "mlp_spec",
    "named_leaves",
    "random_permutation",
    "resnet_spec",
    "validate",
    "vit_block_spec",
    "weight_matching",
]
