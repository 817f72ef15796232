"""A slimmable Vision Transformer: attention heads and MLP hidden units slim."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from optax_wa.slimmable.layers import (
    SlimmableConv,
    SlimmableLinear,
    SwitchableLayerNorm,
    slim_size,
    validate_widths,
)
from optax_wa.slimmable.models import SlimmableEncoder

Array = jax.Array


_qkv_init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
_out_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)


class SlimmableAttention(nnx.Module):
    r"""Multi-head self-attention whose width-``w`` call keeps the first heads.

    Query, key and value kernels have shape ``(embed, heads, head_dim)`` and
    the output kernel ``(heads, head_dim, embed)``; width ``w`` uses the first
    ``h = slim_size(heads, w)`` heads, so the embedding dimension (the
    residual stream) is shared by all widths:

    .. math::
      \operatorname{Attn}_w(x) = \sum_{i < h} \operatorname{softmax}\!\Big(
      \frac{q_i k_i^\top}{\sqrt{d}}\Big) v_i\, W^O_i + b^O .

    Args:
      embed_dim: the embedding dimension (shared).
      num_heads: the full number of heads.
      head_dim: per-head dimension (default ``embed_dim // num_heads``).
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableAttention
      >>> attn = SlimmableAttention(8, 4, rngs=nnx.Rngs(0))
      >>> attn(jnp.ones((2, 5, 8)), width=0.5).shape
      (2, 5, 8)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        head_dim = head_dim or embed_dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        shape = (embed_dim, num_heads, head_dim)
        for name in ("query", "key", "value"):
            setattr(
                self,
                name,
                nnx.Param(_qkv_init(rngs.params(), shape), slim_axes=(1,)),
            )
            setattr(
                self,
                name + "_bias",
                nnx.Param(jnp.zeros((num_heads, head_dim)), slim_axes=(0,)),
            )
        self.out = nnx.Param(
            _out_init(rngs.params(), (num_heads, head_dim, embed_dim)), slim_axes=(0,)
        )
        self.out_bias = nnx.Param(jnp.zeros((embed_dim,)))

    def __call__(self, x: Array, width: float = 1.0) -> Array:
        h = slim_size(self.num_heads, width)

        def project(kernel, bias):
            return jnp.einsum("...te,ehd->...thd", x, kernel[:, :h]) + bias[:h]

        q = project(self.query, self.query_bias)
        k = project(self.key, self.key_bias)
        v = project(self.value, self.value_bias)
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(
            jnp.asarray(self.head_dim, q.dtype)
        )
        weights = jax.nn.softmax(logits, axis=-1)
        o = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        return jnp.einsum("...qhd,hde->...qe", o, self.out[:h]) + self.out_bias[...]


class _ViTBlock(nnx.Module):
    def __init__(self, embed_dim, num_heads, mlp_dim, widths, *, head_dim, rngs):
        self.ln1 = SwitchableLayerNorm(embed_dim, widths, sliced=False, rngs=rngs)
        self.attn = SlimmableAttention(
            embed_dim, num_heads, head_dim=head_dim, rngs=rngs
        )
        self.ln2 = SwitchableLayerNorm(embed_dim, widths, sliced=False, rngs=rngs)
        self.fc1 = SlimmableLinear(embed_dim, mlp_dim, slice_input=False, rngs=rngs)
        self.fc2 = SlimmableLinear(mlp_dim, embed_dim, slice_output=False, rngs=rngs)

    def __call__(self, x, width):
        x = x + self.attn(self.ln1(x, width), width)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x, width), width)), width)


class SlimmableViT(SlimmableEncoder):
    """A slimmable Vision Transformer (an extension beyond the SlimCLR paper).

    Width ``w`` keeps the first ``slim_size(num_heads, w)`` attention heads
    and ``slim_size(mlp_dim, w)`` MLP hidden units of every block; the patch
    embedding, the positional embedding, the class token and the embedding
    dimension are shared, and every width has its own LayerNorm parameters
    (:class:`SwitchableLayerNorm`). The representation is the final class
    token, of size ``embed_dim`` at every width (``features_sliced`` is False).

    Args:
      image_size: the (square) input size.
      patch_size: the (square) patch size.
      embed_dim: the embedding dimension.
      depth: the number of blocks.
      num_heads: the full number of heads.
      mlp_dim: the full MLP hidden size.
      widths: the widths the network is trained at.
      in_channels: image channels.
      head_dim: per-head dimension (default ``embed_dim // num_heads``).
      projection_dim: the embedding size of the head, or ``None``.
      head_hidden: hidden size of the head (default ``embed_dim``).
      head_type: the projection head, ``"mocov2"``, ``"simclr"`` or
        ``"mocov3"`` (:class:`SlimmableProjectionHead`).
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableViT
      >>> vit = SlimmableViT(8, 4, 16, 1, 4, 32, (1.0, 0.5), projection_dim=8,
      ...                    rngs=nnx.Rngs(0))
      >>> vit(jnp.ones((2, 8, 8, 3)), width=0.5).shape
      (2, 8)
    """

    features_sliced = False

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        widths: Sequence[float],
        *,
        in_channels: int = 3,
        head_dim: int | None = None,
        projection_dim: int | None = 256,
        head_hidden: int | None = None,
        head_type: str = "mocov2",
        rngs: nnx.Rngs,
    ) -> None:
        if image_size % patch_size:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})."
            )
        self.widths = validate_widths(widths)
        self.patch_embed = SlimmableConv(
            in_channels,
            embed_dim,
            (patch_size, patch_size),
            strides=patch_size,
            padding="VALID",
            slice_input=False,
            slice_output=False,
            rngs=rngs,
        )
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nnx.Param(jnp.zeros((1, 1, embed_dim)))
        self.pos_embedding = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (1, num_patches + 1, embed_dim))
        )
        self.blocks = nnx.List(
            [
                _ViTBlock(
                    embed_dim,
                    num_heads,
                    mlp_dim,
                    self.widths,
                    head_dim=head_dim,
                    rngs=rngs,
                )
                for _ in range(depth)
            ]
        )
        self.norm = SwitchableLayerNorm(embed_dim, self.widths, sliced=False, rngs=rngs)
        self.num_features = embed_dim
        self.head = self._make_head(projection_dim, head_hidden, head_type, rngs)

    def features(
        self, x: Array, width: float = 1.0, use_running_average: bool | None = None
    ) -> Array:
        del use_running_average  # no batch statistics in the backbone
        x = self.patch_embed(x, width)
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, x.shape[-1])).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...]
        for block in self.blocks:
            x = block(x, width)
        return self.norm(x[:, 0], width)
