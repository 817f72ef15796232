"""Permutation specs of Flax NNX models: MLP, conv stack, ResNet, ViT blocks.

Each builder takes an ``nnx.Module``, an ``nnx.State`` or the pure dict of
one (parameters and batch statistics) and returns a
:class:`~optax_wa.permutation.PermutationSpec` over every leaf of it; a
params-only tree is a sub-tree and works with the same spec. Hidden units
get groups named after the layer that writes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

from optax_wa.permutation._axes import SubAxes, join, named_leaves, path_str
from optax_wa.permutation.spec import PermutationSpec, validate

if TYPE_CHECKING:
    from flax import nnx

__all__ = ["conv_spec", "mlp_spec", "resnet_spec", "vit_block_spec"]

_NORM_LEAVES = ("scale", "bias", "mean", "var")


class _Tree(NamedTuple):
    pure: dict  # nested pure dict of arrays
    batch_stats: frozenset  # leaf paths of batch statistics
    modules: dict  # module path -> nnx.Module (empty for a plain tree)


def _as_tree(model_or_tree) -> _Tree:
    from flax import nnx

    if isinstance(model_or_tree, nnx.Module):
        state = nnx.state(model_or_tree, nnx.Any(nnx.Param, nnx.BatchStat))
        stats = nnx.state(model_or_tree, nnx.BatchStat)
        modules = {
            "/".join(str(k) for k in path): m
            for path, m in nnx.iter_modules(model_or_tree)
        }
        return _Tree(state.to_pure_dict(), frozenset(named_leaves(stats)), modules)
    if isinstance(model_or_tree, nnx.State):
        flat, _ = jax.tree_util.tree_flatten_with_path(
            model_or_tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
        stats = {path_str(p) for p, v in flat if isinstance(v, nnx.BatchStat)}
        return _Tree(model_or_tree.to_pure_dict(), frozenset(stats), {})
    if not isinstance(model_or_tree, Mapping):
        raise TypeError(
            "spec builders take an nnx.Module, an nnx.State or a nested dict of "
            f"arrays, got {type(model_or_tree).__name__}."
        )
    # A plain dict: leaves named mean/var beside each other are batch stats.
    stats = set()
    for leaf in named_leaves(model_or_tree):
        parent, _, name = leaf.rpartition("/")
        if name in ("mean", "var"):
            stats.add(leaf)
    return _Tree(model_or_tree, frozenset(stats), {})


def _subtree(tree: _Tree, path: str):
    node = tree.pure
    walked = []
    for part in [p for p in path.split("/") if p]:
        if not isinstance(node, Mapping):
            raise ValueError(f"no module at {path!r}: {'/'.join(walked)!r} is a leaf.")
        if part in node:
            node = node[part]
        elif part.lstrip("-").isdigit() and int(part) in node:
            node = node[int(part)]
        else:
            keys = sorted(str(k) for k in node)
            raise ValueError(
                f"no module at {path!r}: {'/'.join(walked) or '<root>'!r} has keys {keys}."
            )
        walked.append(part)
    return node


def _children(tree: _Tree, path: str) -> list[str]:
    """Paths of the children of a container (list, nnx.List, nnx.Sequential)."""
    node = _subtree(tree, path)
    if not isinstance(node, Mapping):
        raise ValueError(f"{path!r} is a leaf, not a container of blocks.")
    if set(node) == {"layers"} and isinstance(node["layers"], Mapping):
        path, node = join(path, "layers"), node["layers"]  # nnx.Sequential
    return [join(path, str(k)) for k in sorted(node, key=lambda k: (str(type(k)), k))]


def _layer_kind(tree: _Tree, path: str) -> str:
    """``'linear'``, ``'conv'`` or ``'norm'``; errors for anything else."""
    from flax import nnx

    module = tree.modules.get(path)
    if module is not None:
        if isinstance(module, nnx.Linear):
            return "linear"
        if isinstance(module, nnx.Conv):
            if getattr(module, "feature_group_count", 1) != 1:
                raise ValueError(
                    f"layer {path!r}: grouped convolutions (feature_group_count="
                    f"{module.feature_group_count}) are not supported."
                )
            return "conv"
        if isinstance(module, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm)):
            return "norm"
        if isinstance(module, nnx.GroupNorm) and module.num_groups == 1:
            return "norm"
        raise ValueError(
            f"layer {path!r} is a {type(module).__name__}; the builders handle "
            "nnx.Linear, nnx.Conv, nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm."
        )
    node = _subtree(tree, path)
    if (
        isinstance(node, Mapping)
        and "kernel" in node
        and not isinstance(node["kernel"], Mapping)
    ):
        return "linear" if np.ndim(node["kernel"]) == 2 else "conv"
    if (
        isinstance(node, Mapping)
        and node
        and set(map(str, node)) <= set(_NORM_LEAVES)
        and all(np.ndim(v) == 1 for v in node.values())
    ):
        return "norm"
    raise ValueError(f"{path!r} is not a Linear, Conv or normalization layer.")


def _discover_layers(tree: _Tree, root: str = "") -> list[str]:
    """Every Linear/Conv/norm layer under ``root`` in tree order."""
    out = []

    def visit(path):
        node = _subtree(tree, path)
        if not isinstance(node, Mapping):
            return
        try:
            _layer_kind(tree, path)
            is_layer = True
        except ValueError:
            is_layer = False
        if is_layer:
            out.append(path)
            return
        for k in sorted(node, key=lambda k: (str(type(k)), k)):
            visit(join(path, str(k)))

    visit(root)
    return out


class _Builder:
    """Accumulates spec entries over a tree; every leaf starts unpermuted."""

    def __init__(self, model_or_tree):
        self.tree = _as_tree(model_or_tree)
        self.leaves = named_leaves(self.tree.pure)
        self.entries = {leaf: (None,) * np.ndim(x) for leaf, x in self.leaves.items()}
        self.sizes: dict[str, int] = {}

    def set(self, leaf: str, groups: tuple):
        if leaf not in self.leaves:
            raise ValueError(f"no leaf {leaf!r} in the tree.")
        if len(groups) != np.ndim(self.leaves[leaf]):
            raise ValueError(
                f"leaf {leaf!r} has shape {np.shape(self.leaves[leaf])}, expected "
                f"{len(groups)} axes."
            )
        self.entries[leaf] = tuple(groups)

    def chain(self, layers: Sequence[str], in_group, out_group, *, what: str):
        """Assigns groups along a chain of layers; returns its output group.

        Each Linear/Conv writes a new group named after its path, except the
        last one of the chain, which writes ``out_group`` (``None``: the
        chain's outputs are not permuted). Norm layers take the current group.
        """
        # Why this is a symmetry: a layer y = phi(x W + b) with its output
        # units permuted by P computes y P when W -> W P and b -> b P (phi acts
        # unit-wise, and so do norms, whose scale, bias, mean and var follow
        # P); the next layer reads y P and gives the same output when its
        # kernel's input axis is permuted too, P^T W' (rows). So each kernel
        # carries (group it reads, group it writes) on its last two axes, and
        # a conv kernel (..., in, out) the same on its channel axes.
        kinds = {p: _layer_kind(self.tree, p) for p in layers}
        kernels = [p for p in layers if kinds[p] in ("linear", "conv")]
        current, previous = in_group, "the input"
        width = None if in_group is None else self.sizes[in_group]
        for p in layers:
            node = _subtree(self.tree, p)
            if kinds[p] == "norm":
                n = int(np.shape(next(iter(node.values())))[0])
                if width is not None and n != width:
                    raise ValueError(
                        f"{what}: norm layer {p!r} has {n} features but {previous} "
                        f"gives {width}. Pass the layers in forward order."
                    )
                for name in node:
                    self.set(join(p, str(name)), (current,))
                width, previous = n, f"layer {p!r}"
                continue
            kernel = node["kernel"]
            n_in, n_out = np.shape(kernel)[-2], np.shape(kernel)[-1]
            if width is not None and width != n_in:
                raise ValueError(
                    f"{what}: layer {p!r} takes {n_in} input features but {previous} "
                    f"gives {width}. Pass the layers in forward order "
                    "(a dense layer after convolutions needs global pooling, not "
                    "flattening)."
                )
            out = out_group if p == kernels[-1] else p
            if out is not None:
                if out in self.sizes and self.sizes[out] != n_out:
                    raise ValueError(
                        f"{what}: layer {p!r} gives {n_out} features but its output "
                        f"joins group {out!r} of size {self.sizes[out]} (an identity "
                        "shortcut needs equal widths; list the projection layers)."
                    )
                self.sizes[out] = n_out
            self.set(
                join(p, "kernel"), (None,) * (np.ndim(kernel) - 2) + (current, out)
            )
            if "bias" in node:
                self.set(join(p, "bias"), (out,))
            current, previous, width = out, f"layer {p!r}", n_out
        return current

    def build(self) -> PermutationSpec:
        spec = PermutationSpec(self.entries, batch_stats=self.tree.batch_stats)
        validate(spec, self.tree.pure)
        return spec


def _layer_list(
    builder: _Builder, layers, kinds: tuple[str, ...], fn: str
) -> list[str]:
    if layers is None:
        layers = _discover_layers(builder.tree)
        if not layers:
            raise ValueError(f"{fn}: found no layers in the model.")
    elif isinstance(layers, str):
        raise TypeError(f"{fn}: layers must be a sequence of paths, not a str.")
    layers = [
        join(str(p)) if not isinstance(p, tuple) else join(*map(str, p)) for p in layers
    ]
    for p in layers:
        kind = _layer_kind(builder.tree, p)
        if kind not in kinds:
            raise ValueError(
                f"{fn}: layer {p!r} is a {kind} layer; this builder takes {kinds}."
            )
    return layers


def mlp_spec(
    model: nnx.Module | nnx.State | Mapping[str, Any],
    *,
    layers: Sequence[str] | None = None,
) -> PermutationSpec:
    """Spec of an MLP: a chain of ``nnx.Linear`` (and optional norm) layers.

    Each hidden layer's output units form one group named after the layer's
    path; the inputs and the last layer's outputs are not permuted.

    Args:
      model: an ``nnx.Module``, an ``nnx.State`` or a pure dict of it.
      layers: the layer paths in forward order (``"layers/0"``). Default:
        every Linear/norm layer in tree order, which is the forward order for
        layers held in a list (``nnx.List``); attributes are visited in
        sorted name order, so pass ``layers`` when names don't sort that way.

    Returns:
      A :class:`PermutationSpec` over every Param and BatchStat leaf.

    Examples:
      >>> from flax import nnx
      >>> from optax_wa.permutation import mlp_spec
      >>> class MLP(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs),
      ...                             nnx.Linear(8, 2, rngs=rngs)])
      >>> mlp_spec(MLP(nnx.Rngs(0))).leaf_axes["layers/0/kernel"]
      (None, 'layers/0')
    """
    builder = _Builder(model)
    layers = _layer_list(builder, layers, ("linear", "norm"), "mlp_spec")
    builder.chain(layers, None, None, what="mlp_spec")
    return builder.build()


def conv_spec(
    model: nnx.Module | nnx.State | Mapping[str, Any],
    *,
    layers: Sequence[str] | None = None,
) -> PermutationSpec:
    """Spec of a conv stack: ``nnx.Conv`` (+ norm) layers, then dense layers.

    Channels of each hidden conv and units of each hidden dense layer form a
    group named after the layer's path; BatchNorm scale, bias, mean and var
    follow their channels. A dense layer after the convolutions must see
    globally pooled channels (its input width equals the channel count).

    Args:
      model: an ``nnx.Module``, an ``nnx.State`` or a pure dict of it.
      layers: layer paths in forward order (default: tree order, see
        :func:`mlp_spec`).

    Returns:
      A :class:`PermutationSpec`.
    """
    builder = _Builder(model)
    layers = _layer_list(builder, layers, ("linear", "conv", "norm"), "conv_spec")
    builder.chain(layers, None, None, what="conv_spec")
    return builder.build()


def _paths(x, what: str) -> list[str]:
    if isinstance(x, str):
        return [x]
    if not isinstance(x, Sequence):
        raise TypeError(f"{what} must be a path or a sequence of paths, got {x!r}.")
    return [str(p) for p in x]


def resnet_spec(
    model: nnx.Module | nnx.State | Mapping[str, Any],
    *,
    stem: Sequence[str],
    stages: Sequence[str | Sequence[str]],
    head: Sequence[str],
    block: Sequence[str] = ("conv1", "bn1", "conv2", "bn2"),
    shortcut: Sequence[str] = ("shortcut_conv", "shortcut_bn"),
) -> PermutationSpec:
    """Spec of a ResNet: residual streams share one permutation per stage.

    The residual stream (the stem's output and every block's output) carries
    one group, ``"residual/0"``; a block with projection layers (``shortcut``
    present in it) starts a new stream group ``"residual/1"``, ... which the
    rest of its stage shares. Inside a block, every conv but the last writes
    its own group (named after its path); the last conv and the projection
    write the stream group. Norm layers (BatchNorm scale/bias/mean/var)
    follow the channels before them, so post-activation (conv, bn) and
    pre-activation (bn, conv) blocks both work. The head reads the last
    stream (after global pooling) and its outputs are not permuted.

    Args:
      model: an ``nnx.Module``, an ``nnx.State`` or a pure dict of it.
      stem: paths of the stem layers in forward order, e.g. ``("conv", "bn")``.
      stages: one entry per stage: the path of a container of blocks
        (``nnx.List``/list/``nnx.Sequential``, blocks in index order) or an
        explicit sequence of block paths.
      head: paths of the head layers, e.g. ``("fc",)``.
      block: layer names inside a block, in forward order (bottleneck:
        ``("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")``).
      shortcut: layer names of the projection shortcut inside a block; a block
        without them has an identity shortcut.

    Returns:
      A :class:`PermutationSpec`.
    """
    builder = _Builder(model)
    stem, head = _paths(stem, "stem"), _paths(head, "head")
    block, shortcut = _paths(block, "block"), _paths(shortcut, "shortcut")
    if not stem or not head:
        raise ValueError("resnet_spec: stem and head each need at least one layer.")
    # A residual block adds its output to its input, x + f(x): permuting the
    # sum by P needs x and f(x) permuted by the same P, so every block of a
    # stream writes the stream's group. A projection shortcut reads the old
    # stream and writes a new one (new width), which starts a new group.
    num_streams = 0
    stream = builder.chain(stem, None, "residual/0", what="resnet_spec stem")
    for k, stage in enumerate(stages):
        blocks = (
            _children(builder.tree, stage) if isinstance(stage, str) else list(stage)
        )
        if not blocks:
            raise ValueError(f"resnet_spec: stage {k} has no blocks.")
        for b in blocks:
            b = str(b)
            node = _subtree(builder.tree, b)
            present = [name for name in shortcut if _first(name) in node]
            if present and len(present) != len(shortcut):
                raise ValueError(
                    f"resnet_spec: block {b!r} has shortcut layers {present} but not "
                    f"all of {list(shortcut)}."
                )
            missing = [name for name in block if _first(name) not in node]
            if missing:
                raise ValueError(
                    f"resnet_spec: block {b!r} has no layer(s) {missing}; its keys are "
                    f"{sorted(map(str, node))}. Pass `block=` with its layer names."
                )
            out = stream
            if present:
                num_streams += 1
                out = f"residual/{num_streams}"
                builder.chain(
                    [join(b, s) for s in shortcut], stream, out, what=f"block {b!r}"
                )
            builder.chain([join(b, s) for s in block], stream, out, what=f"block {b!r}")
            stream = out
    builder.chain(head, stream, None, what="resnet_spec head")
    return builder.build()


def _first(name: str):
    first = name.split("/")[0]
    return int(first) if first.isdigit() else first


def vit_block_spec(
    model: nnx.Module | nnx.State | Mapping[str, Any],
    *,
    blocks: str | Sequence[str] | None = None,
    attention: str = "attention",
    mlp: Sequence[str] = ("mlp_in", "mlp_out"),
    permute_head_dims: bool = False,
    num_heads: int | None = None,
) -> PermutationSpec:
    """Spec of transformer blocks: whole attention heads and MLP hidden units.

    Two attention layouts are recognised:

    * ``nnx.MultiHeadAttention`` (query/key/value kernels
      ``(features, heads, head_dim)``, out kernel ``(heads, head_dim,
      features)``): the head axis of all four projections carries one group
      ``"<attention path>/heads"``. With ``permute_head_dims`` the head
      dimension is permuted too, one permutation shared by all heads: query
      and key jointly (``.../qk_dims``), value with the out projection's
      input (``.../v_dims``).
    * A fused ``qkv`` ``nnx.Linear`` (outputs laid out as ``(3, heads,
      head_dim)``) and an ``out`` ``nnx.Linear`` (inputs ``(heads,
      head_dim)``): the head sub-axis carries ``.../heads`` (see
      :class:`SubAxes`); with ``permute_head_dims`` one group
      ``.../head_dims`` permutes the head dimension of q, k, v and out
      jointly. The head count comes from the module's ``num_heads``
      attribute or the ``num_heads`` argument.

    The MLP's hidden units form groups named after its layers. The residual
    stream (embeddings, norms, block inputs/outputs) is not permuted.

    Args:
      model: an ``nnx.Module``, an ``nnx.State`` or a pure dict of it.
      blocks: ``None`` (the model is one block), the path of a container of
        blocks, or a sequence of block paths.
      attention: path of the attention module inside a block.
      mlp: paths of the MLP layers inside a block, in forward order.
      permute_head_dims: also permute inside heads (see above).
      num_heads: heads of a fused ``qkv`` attention when the model is given
        as a tree (ignored when the module has ``num_heads``).

    Returns:
      A :class:`PermutationSpec`.
    """
    builder = _Builder(model)
    if blocks is None:
        block_paths = [""]
    elif isinstance(blocks, str):
        block_paths = _children(builder.tree, blocks)
    else:
        block_paths = [str(b) for b in blocks]
    for b in block_paths:
        attn = join(b, attention)
        node = _subtree(builder.tree, attn)
        keys = set(map(str, node)) if isinstance(node, Mapping) else set()
        if {"query", "key", "value", "out"} <= keys:
            _attention_heads(builder, attn, node, permute_head_dims)
        elif {"qkv", "out"} <= keys:
            module = builder.tree.modules.get(attn)
            heads = getattr(module, "num_heads", None) or num_heads
            _fused_attention_heads(builder, attn, node, heads, permute_head_dims)
        else:
            raise ValueError(
                f"vit_block_spec: {attn or '<root>'!r} is neither an "
                "nnx.MultiHeadAttention (query, key, value, out) nor a fused "
                f"attention (qkv, out); its keys are {sorted(keys)}."
            )
        builder.chain(
            [join(b, m) for m in _paths(mlp, "mlp")], None, None, what=f"block {b!r}"
        )
    return builder.build()


def _attention_heads(builder: _Builder, attn: str, node, permute_head_dims: bool):
    q_shape = np.shape(node["query"]["kernel"])
    if len(q_shape) != 3:
        raise ValueError(
            f"vit_block_spec: {join(attn, 'query/kernel')!r} has shape {q_shape}; "
            "expected (features, heads, head_dim)."
        )
    for proj in ("key", "value"):
        heads = np.shape(node[proj]["kernel"])[1]
        if heads != q_shape[1]:
            raise ValueError(
                f"vit_block_spec: {join(attn, proj)!r} has {heads} heads but the "
                f"query has {q_shape[1]}; grouped key/value heads are not supported."
            )
    heads = join(attn, "heads")
    qk = join(attn, "qk_dims") if permute_head_dims else None
    v = join(attn, "v_dims") if permute_head_dims else None
    for proj, dims in (("query", qk), ("key", qk), ("value", v)):
        builder.set(join(attn, proj, "kernel"), (None, heads, dims))
        if "bias" in node[proj]:
            builder.set(join(attn, proj, "bias"), (heads, dims))
    builder.set(join(attn, "out", "kernel"), (heads, v, None))
    for ln in ("query_ln", "key_ln"):
        for name in node.get(ln, {}):
            builder.set(join(attn, ln, str(name)), (qk,))


def _fused_attention_heads(
    builder: _Builder, attn: str, node, heads, permute_head_dims
):
    width = np.shape(node["qkv"]["kernel"])[-1]
    if not isinstance(heads, (int, np.integer)) or heads < 1:
        raise ValueError(
            f"vit_block_spec: the fused attention {attn!r} needs its head count: "
            "pass num_heads= (the module has no num_heads attribute)."
        )
    if width % (3 * heads):
        raise ValueError(
            f"vit_block_spec: {join(attn, 'qkv/kernel')!r} has {width} outputs, not "
            f"a multiple of 3 * num_heads = {3 * heads}."
        )
    head_dim = width // (3 * heads)
    group = join(attn, "heads")
    dims = join(attn, "head_dims") if permute_head_dims else None
    qkv = SubAxes((3, heads, head_dim), (None, group, dims))
    builder.set(join(attn, "qkv", "kernel"), (None, qkv))
    if "bias" in node["qkv"]:
        builder.set(join(attn, "qkv", "bias"), (qkv,))
    out_in = np.shape(node["out"]["kernel"])[0]
    if out_in != heads * head_dim:
        raise ValueError(
            f"vit_block_spec: {join(attn, 'out/kernel')!r} takes {out_in} inputs; "
            f"expected heads * head_dim = {heads * head_dim}."
        )
    builder.set(
        join(attn, "out", "kernel"), (SubAxes((heads, head_dim), (group, dims)), None)
    )
