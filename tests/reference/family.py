"""PyTorch reference of the DiNAT paper's other classifiers: DiNAT_s, isotropic NAT / DiNAT and ViT-rpb.

Test/dev helper only (imports torch); written from the DiNAT paper and the fixture README
(tests/data/family/README.md), with the neighborhood attention of torch_natten.py. Module names
follow the ``state_dict`` of SHI-Labs' classification checkpoints (``patch_embed.proj``,
``layers.i.blocks.j.attn.qkv``, ``head``, ...), so that an original ``.pth`` loads with
``load_state_dict`` and the fixtures check this reference before the engine is checked against it.

* DiNAT_s: Swin's hierarchy with (dilated) neighborhood attention. A 4x4 stride-4 patch embedding
  (input zero-padded at the bottom/right to a multiple of 4) and LayerNorm; stages of pre-norm
  transformer layers, each with its own dilation; between stages a 2x2 patch merging (the 2x2
  neighbours concatenated in the order (0,0), (1,0), (0,1), (1,1) as (row, column) offsets, an odd
  map zero-padded first; LayerNorm over 4C; linear 4C -> 2C without bias); final LayerNorm, mean
  pool, linear head.
* NATIsotropic: one resolution throughout (patch_size x patch_size embedding, no merging); layer
  ``i`` uses dilation 1 when ``i`` is even and ``dilation`` otherwise; with
  ``layer="VisionTransformerLayer"`` (ViT-rpb) every layer is global self-attention with a relative
  position bias table of shape ``(heads, 2L-1, 2L-1)`` for an ``L x L`` token grid, read at the
  key-minus-query offset; the input must then give exactly that grid.

Neighborhood attention on a feature map smaller than ``kernel_size * dilation`` zero-pads the normed
map at the bottom/right and crops the result, as NATTEN's module did before 0.17 and transformers'
DiNAT does (NATTEN 0.17 refuses such maps; the published models never meet one at their resolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference.torch_natten import na2d_av, na2d_qk

__all__ = ["DiNATs", "NATIsotropic", "relative_position_index", "build"]

# Constructor arguments that only matter for training; accepted and ignored, as at inference.
TRAINING_ONLY = ("drop_rate", "attn_drop_rate", "drop_path_rate")


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, nn.GELU's default


class NeighborhoodSelfAttention(nn.Module):
    """Multi-head (dilated) neighborhood attention with relative position bias, on ``(B, H, W, C)``."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int, qkv_bias: bool,
                 qk_scale: float | None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.kernel_size, self.dilation = kernel_size, dilation
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        window = self.kernel_size * self.dilation
        padded_height, padded_width = max(height, window), max(width, window)
        x = F.pad(x, (0, 0, 0, padded_width - width, 0, padded_height - height))
        qkv = self.qkv(x).reshape(batch, padded_height, padded_width, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(3, 0, 4, 1, 2, 5)  # each (batch, heads, height, width, head_dim)
        logits = na2d_qk(query * self.scale, key, self.kernel_size, self.dilation, rpb=self.rpb)
        context = na2d_av(logits.softmax(dim=-1), value, self.kernel_size, self.dilation)
        context = context.permute(0, 2, 3, 1, 4).reshape(batch, padded_height, padded_width, dim)
        return self.proj(context[:, :height, :width])


def relative_position_index(length: int) -> torch.Tensor:
    """ViT-rpb's index, for every (query, key) pair of an ``length x length`` token grid (row-major), into
    the flattened ``(2L-1) x (2L-1)`` bias table: the key's (row, column) offset from the query, each
    shifted by ``L - 1`` to start at 0."""
    rows, columns = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    rows, columns = rows.flatten(), columns.flatten()
    row_offset = rows[None, :] - rows[:, None] + length - 1  # [query, key]
    column_offset = columns[None, :] - columns[:, None] + length - 1
    return row_offset * (2 * length - 1) + column_offset


class GlobalSelfAttention(nn.Module):
    """Multi-head self-attention over all ``L x L`` tokens with ViT-rpb's relative position bias."""

    def __init__(self, dim: int, num_heads: int, length: int, qkv_bias: bool, qk_scale: float | None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.length = num_heads, dim // num_heads, length
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * length - 1, 2 * length - 1))
        # Stored in the original checkpoints too; loading one replaces it, and the loaded index is used.
        self.register_buffer("relative_position_index", relative_position_index(length))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        if (height, width) != (self.length, self.length):
            raise ValueError(
                f"token grid {height}x{width}, the relative position bias is for {self.length}x{self.length}")
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, tokens, head_dim)
        bias = self.rpb.flatten(1)[:, self.relative_position_index]  # (heads, tokens, tokens)
        attention = ((query * self.scale) @ key.transpose(-2, -1) + bias).softmax(dim=-1)
        context = (attention @ value).transpose(1, 2).reshape(batch, height, width, dim)
        return self.proj(context)


class TransformerLayer(nn.Module):
    """Pre-norm layer: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, attention: nn.Module, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attention
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution (stride ``patch``) after zero-padding the image at the
    bottom/right to a multiple of ``patch``; channels-last output, LayerNorm'd when ``norm``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        pixels = F.pad(pixels, (0, -width % self.patch_size, 0, -height % self.patch_size))
        x = self.proj(pixels).permute(0, 2, 3, 1)
        return x if self.norm is None else self.norm(x)


class PatchMerging(nn.Module):
    """2x2 neighbours side by side (order (0,0), (1,0), (0,1), (1,1)), LayerNorm, linear 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks, self.downsample = nn.ModuleList(blocks), downsample


class DiNATs(nn.Module):
    """DiNAT_s with SHI-Labs' constructor arguments and defaults (dilations None: all 1)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), kernel_size: int = 7, dilations=None,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 patch_norm: bool = True, **training_only) -> None:
        super().__init__()
        _check_training_only(training_only)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.layers = nn.ModuleList()
        for stage, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            dim = embed_dim * 2**stage
            blocks = [
                TransformerLayer(dim, NeighborhoodSelfAttention(
                    dim, heads, kernel_size, 1 if dilations is None else dilations[stage][i], qkv_bias, qk_scale,
                ), mlp_ratio)
                for i in range(depth)
            ]
            self.layers.append(Stage(blocks, PatchMerging(dim) if stage < len(depths) - 1 else None))
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_stages(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The embedding, each stage's output before its patch merging, and after it (channels-last)."""
        x = embedded = self.patch_embed(pixels)
        before, after = [], []
        for stage in self.layers:
            for block in stage.blocks:
                x = block(x)
            before.append(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
            after.append(x)
        return embedded, before, after

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm, then the mean over all positions: ``(batch, num_features)``."""
        return self.norm(self.forward_stages(pixels)[2][-1]).mean(dim=(1, 2))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(pixels))


class NATIsotropic(nn.Module):
    """The isotropic models with SHI-Labs' constructor arguments and defaults."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, kernel_size: int | None = 7,
                 dilation: int | None = 2, layer: str = "NATransformerLayer", patch_norm: bool = True,
                 **training_only) -> None:
        super().__init__()
        _check_training_only(training_only)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        length = img_size // patch_size
        if layer == "VisionTransformerLayer":
            def attention(i: int) -> nn.Module:
                return GlobalSelfAttention(embed_dim, num_heads, length, qkv_bias, qk_scale)
        elif layer == "NATransformerLayer":
            def attention(i: int) -> nn.Module:
                return NeighborhoodSelfAttention(
                    embed_dim, num_heads, kernel_size, 1 if i % 2 == 0 else dilation, qkv_bias, qk_scale
                )
        else:
            raise ValueError(f"unknown layer {layer!r}")
        self.layers = nn.Sequential(*[TransformerLayer(embed_dim, attention(i), mlp_ratio) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.patch_embed(pixels))).mean(dim=(1, 2))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(pixels))


def _check_training_only(arguments: dict) -> None:
    unknown = sorted(set(arguments) - set(TRAINING_ONLY))
    if unknown:
        raise TypeError(f"unexpected constructor arguments {unknown}")


def build(constructor: str, kwargs: dict) -> nn.Module:
    """The reference model for an original-arguments description (``{"constructor", "kwargs"}``)."""
    classes = {"DiNAT_s": DiNATs, "NATIsotropic": NATIsotropic}
    return classes[constructor](**kwargs).eval()
