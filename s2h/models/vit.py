"""Vision Transformers for 32x32 input, patch 4 (the S2HPruner paper's CIFAR-100 setting, Appendix A1).

* ``vit_cifar`` — the ViT of Lee et al. 2021 ("Vision Transformer for Small-Size Datasets", the
  paper's reference [31] for the CIFAR recipe) that the S2HPruner paper prunes in Fig. 4(d):
  embedding 192, 9 pre-norm blocks, 12 heads of 16 dims, MLP hidden 384 (ratio 2), a class token,
  learned position embeddings, a linear patch embedding (4x4 patches: 64 tokens + the class token).
* ``swin_cifar`` — a small Swin Transformer (Fig. 4(e)): embedding 96, stages of depth (2, 6, 4)
  with (3, 6, 12) heads of 32 dims, MLP ratio 2, window 4, patch 4 (8x8 -> 4x4 -> 2x2 tokens).
  A stage whose resolution is at most the window size uses one window of its resolution and no
  shift (as the original Swin does), so no padding is ever attended.

Every module is a plain ``torch.nn`` module. Attention is an explicit ``qkv`` ``nn.Linear``, two
matmuls and a ``proj`` ``nn.Linear``, with the number of heads and the head dimension as free
parameters (``head_dim`` need not be ``dim // num_heads``; ``scale`` need not be ``head_dim**-0.5``),
so a pruned model (fewer heads, narrower heads) is the same classes with other sizes.
:class:`WindowAttention` has the attributes and call convention of torchvision's
``ShiftedWindowAttention`` (input ``[B, H, W, C]``; padding to whole windows, cyclic shift, the
shifted-window mask, relative position bias) and computes the same function.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "WindowAttention",
    "Mlp",
    "ViTBlock",
    "VisionTransformer",
    "SwinBlock",
    "PatchMerging",
    "SwinTransformer",
    "vit_cifar",
    "swin_cifar",
    "token_attention",
    "window_attention",
]


# --------------------------------------------------------------------------------------------
# Attention math, shared by the plain modules and the S2H modules (s2h/structured/attention.py)
# --------------------------------------------------------------------------------------------


def token_attention(x: torch.Tensor, qkv: Callable, proj: Callable, head_dim: int, scale: float,
                    attn_drop: float = 0.0, training: bool = False, head_mask: torch.Tensor | None = None,
                    need_weights: bool = False):
    """Multi-head self-attention over tokens ``x: [B, N, C]``.

    ``qkv(x)`` returns ``[B, N, 3 * h * head_dim]`` laid out (q|k|v, head, dim); the number of
    heads ``h`` is read from its width. ``head_mask`` (``[h]``) scales each head's output (the S2H
    soft mask). Returns ``proj(heads)``, and the attention probabilities ``[B, h, N, N]`` when
    ``need_weights``.
    """
    B, N, _ = x.shape
    q, k, v = qkv(x).reshape(B, N, 3, -1, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, d] each
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    probs = attn if need_weights else None
    attn = F.dropout(attn, attn_drop, training)
    out = attn @ v
    if head_mask is not None:
        out = out * head_mask.to(out.dtype).view(1, -1, 1, 1)
    out = proj(out.transpose(1, 2).reshape(B, N, -1))
    return (out, probs) if need_weights else out


def _shift_mask(pad_h: int, pad_w: int, window: List[int], shift: List[int], device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """The shifted-window attention mask ``[num_windows, Nw, Nw]`` (0 or -100), as torchvision builds it."""
    mask = torch.zeros((pad_h, pad_w), device=device, dtype=dtype)
    h_cuts = [0, pad_h - window[0], pad_h - shift[0], pad_h]
    w_cuts = [0, pad_w - window[1], pad_w - shift[1], pad_w]
    count = 0
    for i in range(3):
        for j in range(3):
            mask[h_cuts[i]:h_cuts[i + 1], w_cuts[j]:w_cuts[j + 1]] = count
            count += 1
    nw = (pad_h // window[0]) * (pad_w // window[1])
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(nw, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def window_geometry(h: int, w: int, window: List[int], shift: List[int]) -> Tuple[int, int, int, List[int]]:
    """(padded H, padded W, number of windows, effective shift) of a ``[B, h, w, C]`` input."""
    pad_h = h + (window[0] - h % window[0]) % window[0]
    pad_w = w + (window[1] - w % window[1]) % window[1]
    shift = [0 if window[0] >= pad_h else shift[0], 0 if window[1] >= pad_w else shift[1]]
    return pad_h, pad_w, (pad_h // window[0]) * (pad_w // window[1]), shift


def _to_windows(x: torch.Tensor, window: List[int], shift: List[int], pad_h: int, pad_w: int) -> torch.Tensor:
    """``[B, H, W, C]`` padded, shifted, cut into windows: ``[B * windows, window tokens, C]``."""
    B, H, W, C = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    x = F.pad(x, (0, 0, 0, pad_w - W, 0, pad_h - H))
    if shift[0] + shift[1] > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(B, pad_h // window[0], window[0], pad_w // window[1], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], C)


def _from_windows(x: torch.Tensor, B: int, H: int, W: int, window: List[int], shift: List[int], pad_h: int,
                  pad_w: int) -> torch.Tensor:
    c_out = x.shape[-1]
    x = x.view(B, pad_h // window[0], pad_w // window[1], window[0], window[1], c_out)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_h, pad_w, c_out)
    if shift[0] + shift[1] > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def _window_core(qkv: torch.Tensor, B: int, num_heads: int, scale: float, relative_position_bias: torch.Tensor,
                 window: List[int], shift: List[int], pad_h: int, pad_w: int, attn_drop: float, training: bool,
                 dim_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention within windows from ``qkv`` ``[B*nw, n, 3*h*d]``: the heads' outputs ``[B*nw, n, h*d]``."""
    bnw, n = qkv.shape[0], qkv.shape[1]
    qkv = qkv.reshape(bnw, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B*nw, h, n, d]
    if dim_mask is not None:
        m = dim_mask.to(q.dtype)
        q, v = q * m, v * m
    attn = (q * scale).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if shift[0] + shift[1] > 0:
        mask = _shift_mask(pad_h, pad_w, window, shift, qkv.device, attn.dtype)
        nw = bnw // B
        attn = attn.view(B, nw, num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, n, n)
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, attn_drop, training)
    return attn.matmul(v).transpose(1, 2).reshape(bnw, n, -1)


def window_attention(x: torch.Tensor, qkv: Callable, proj: Callable, num_heads: int, scale: float,
                     relative_position_bias: torch.Tensor, window: Sequence[int], shift: Sequence[int],
                     attn_drop: float = 0.0, proj_drop: float = 0.0, training: bool = False,
                     dim_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Shifted-window multi-head self-attention of ``x: [B, H, W, C]`` (torchvision's semantics).

    ``qkv`` returns ``3 * num_heads * d`` features laid out (q|k|v, head, dim); the head
    dimension ``d`` is read from its width. ``dim_mask`` (``[d]``, the S2H soft mask over head
    dimensions) scales each head's query dims (so dim j's share of q·k is scaled) and value dims
    (so its share of the output is scaled).
    """
    B, H, W = x.shape[0], x.shape[1], x.shape[2]
    window = list(window)
    pad_h, pad_w, _, shift = window_geometry(H, W, window, list(shift))
    t = _to_windows(x, window, shift, pad_h, pad_w)
    out = _window_core(qkv(t), B, num_heads, scale, relative_position_bias, window, shift, pad_h, pad_w,
                       attn_drop, training, dim_mask)
    out = F.dropout(proj(out), proj_drop, training)
    return _from_windows(out, B, H, W, window, shift, pad_h, pad_w)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention over tokens ``[B, N, dim]``: ``qkv`` Linear, two matmuls, ``proj`` Linear."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, qkv_bias: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, scale: float | None = None):
        super().__init__()
        head_dim = head_dim or dim // num_heads
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"Attention: num_heads and head_dim must be positive, got {num_heads}, {head_dim}")
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        self.scale = float(scale) if scale is not None else head_dim ** -0.5
        self.attn_drop, self.proj_drop = float(attn_drop), float(proj_drop)
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias)

    def _proj(self, x):
        return F.dropout(self.proj(x), self.proj_drop, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # token_attention written out, so that torch.jit.script compiles it (no callables passed)
        B, N = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(B, N, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, h, N, d]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        attn = F.dropout(attn, self.attn_drop, self.training)
        out = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return F.dropout(self.proj(out), self.proj_drop, self.training)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, scale={self.scale:.4g}"


def relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """Index into the ``(2Wh-1)(2Ww-1)`` relative position table for each pair of window tokens (flat)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij"))
    coords = torch.flatten(coords, 1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window[0] - 1
    rel[:, :, 1] += window[1] - 1
    rel[:, :, 0] *= 2 * window[1] - 1
    return rel.sum(-1).flatten()


class WindowAttention(nn.Module):
    """(Shifted-)window multi-head self-attention of ``[B, H, W, dim]`` with relative position bias.

    Same attributes and function as torchvision's ``ShiftedWindowAttention`` (``qkv``, ``proj``,
    ``relative_position_bias_table``, ``relative_position_index``, ``window_size``,
    ``shift_size``, ``num_heads``, ``attention_dropout``, ``dropout``), plus a free ``head_dim``
    and ``scale``.
    """

    def __init__(self, dim: int, window_size: Sequence[int], shift_size: Sequence[int], num_heads: int,
                 head_dim: int | None = None, qkv_bias: bool = True, proj_bias: bool = True,
                 attention_dropout: float = 0.0, dropout: float = 0.0, scale: float | None = None):
        super().__init__()
        head_dim = head_dim or dim // num_heads
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        self.scale = float(scale) if scale is not None else head_dim ** -0.5
        self.attention_dropout, self.dropout = float(attention_dropout), float(dropout)
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias)
        w = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w[0] - 1) * (2 * w[1] - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(w))

    def get_relative_position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # window_attention written out, so that torch.jit.script compiles it (no callables passed)
        B, H, W = x.shape[0], x.shape[1], x.shape[2]
        pad_h, pad_w, _, shift = window_geometry(H, W, self.window_size, self.shift_size)
        t = _to_windows(x, self.window_size, shift, pad_h, pad_w)
        out = _window_core(self.qkv(t), B, self.num_heads, self.scale, self.get_relative_position_bias(),
                           self.window_size, shift, pad_h, pad_w, self.attention_dropout, self.training)
        out = F.dropout(self.proj(out), self.dropout, self.training)
        return _from_windows(out, B, H, W, self.window_size, shift, pad_h, pad_w)

    def extra_repr(self) -> str:
        return (f"window_size={self.window_size}, shift_size={self.shift_size}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, scale={self.scale:.4g}")


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _PreNormBlock(nn.Module):
    """Pre-norm residual block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (stochastic depth on both)."""

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTBlock(_PreNormBlock):
    """ViT block: multi-head self-attention and an MLP (pre-norm residual)."""

    def __init__(self, dim, num_heads, head_dim, mlp_hidden, qkv_bias=False, dropout=0.0, attn_dropout=0.0,
                 drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, head_dim, qkv_bias=qkv_bias, attn_drop=attn_dropout, proj_drop=dropout)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden, dropout)


class VisionTransformer(nn.Module):
    """ViT with a class token: patch embedding (a strided conv), ``depth`` pre-norm blocks, LayerNorm, head."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 100,
                 dim: int = 192, depth: int = 9, num_heads: int = 12, head_dim: int = 16, mlp_ratio: float = 2.0,
                 qkv_bias: bool = False, dropout: float = 0.0, attn_dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"VisionTransformer: image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size = int(image_size), int(patch_size)
        n = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        hidden = int(dim * mlp_ratio)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[ViTBlock(dim, num_heads, head_dim, hidden, qkv_bias, dropout, attn_dropout, r)
                                      for r in rates])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class SwinBlock(_PreNormBlock):
    """Swin block (torchvision's layout ``[B, H, W, C]``): window attention and an MLP, pre-norm, residual."""

    def __init__(self, dim, num_heads, head_dim, window, shift, mlp_hidden, dropout=0.0, attn_dropout=0.0,
                 drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, shift, num_heads, head_dim, attention_dropout=attn_dropout,
                                    dropout=dropout)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden, dropout)


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (4C), LayerNorm, Linear to 2C (torchvision's PatchMerging)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        H, W = x.shape[-3], x.shape[-2]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class SwinTransformer(nn.Module):
    """Swin Transformer for small images: patch embedding + LayerNorm, stages of Swin blocks, patch merging."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 100,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 6, 4), num_heads: Sequence[int] = (3, 6, 12),
                 head_dim: int = 32, window_size: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0,
                 attn_dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"SwinTransformer: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if len(depths) != len(num_heads):
            raise ValueError("SwinTransformer: depths and num_heads must have the same length")
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, patch_size)
        self.embed_norm = nn.LayerNorm(embed_dim)
        res = image_size // patch_size
        total = sum(depths)
        stages, i_block, dim = [], 0, embed_dim
        for s, (depth, heads) in enumerate(zip(depths, num_heads)):
            win = min(window_size, res)  # one window of the whole map when the map is small: no shift
            blocks = []
            for j in range(depth):
                shift = 0 if (j % 2 == 0 or win >= res) else win // 2
                rate = drop_path * i_block / max(total - 1, 1)
                blocks.append(SwinBlock(dim, heads, head_dim, [win, win], [shift, shift], int(dim * mlp_ratio),
                                        dropout, attn_dropout, rate))
                i_block += 1
            stages.append(nn.Sequential(*blocks))
            if s < len(depths) - 1:
                stages.append(PatchMerging(dim))
                dim, res = 2 * dim, (res + 1) // 2
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.embed_norm(self.patch_embed(x).permute(0, 2, 3, 1))  # [B, H, W, C]
        x = self.norm(self.stages(x))
        return self.head(x.mean(dim=(1, 2)))


def vit_cifar(num_classes: int = 100, in_channels: int = 3, image_size: int = 32, **kwargs) -> VisionTransformer:
    """ViT for 32x32 input, patch 4: dim 192, 9 blocks, 12 heads x 16 dims, MLP 384 (the paper's Fig. 4(d))."""
    cfg = dict(patch_size=4, dim=192, depth=9, num_heads=12, head_dim=16, mlp_ratio=2.0)
    cfg.update(kwargs)
    return VisionTransformer(image_size=image_size, in_channels=in_channels, num_classes=num_classes, **cfg)


def swin_cifar(num_classes: int = 100, in_channels: int = 3, image_size: int = 32, **kwargs) -> SwinTransformer:
    """Swin for 32x32 input, patch 4: dim 96, depths (2, 6, 4), heads (3, 6, 12) x 32 dims, window 4, MLP ratio 2."""
    cfg = dict(patch_size=4, embed_dim=96, depths=(2, 6, 4), num_heads=(3, 6, 12), head_dim=32, window_size=4,
               mlp_ratio=2.0)
    cfg.update(kwargs)
    return SwinTransformer(image_size=image_size, in_channels=in_channels, num_classes=num_classes, **cfg)
