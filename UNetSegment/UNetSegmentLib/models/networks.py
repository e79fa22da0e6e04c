"""Segmentation networks: one configurable U-Net (plain / residual / attention), UNet++ and a
multi-path U-Net (one encoder per input modality).

All networks take ``(N, C, *spatial)`` tensors with 2 or 3 spatial dims and return logits
``(N, out_channels, *spatial)``. 2.5D needs no network of its own: it is a 2D network whose
``in_channels`` is ``channels × neighbouring slices`` (the slices are stacked on the channel axis).

Layers are reachable by dotted name for Grad-CAM hooks (``model.get_submodule("decoder.0")``):
``encoder.<i>`` (multi-path: ``path_encoders.<p>.<i>``), ``bottleneck``, ``decoder.<i>`` and ``out_conv``; ``model.default_cam_layer``
names the layer the heatmap code should hook by default.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

NORMS = ("batch", "instance", "group", "none")
UPSAMPLES = ("transpose", "interpolate")
BLOCKS = ("plain", "residual")

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


def _upsample(dims: int, in_ch: int, out_ch: int, mode: str) -> nn.Module:
    """2× up-sampling that also maps ``in_ch`` to ``out_ch`` channels (halving, in a U-Net)."""
    if mode == "transpose":
        return _CONV_T[dims](in_ch, out_ch, kernel_size=2, stride=2)
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear" if dims == 2 else "trilinear", align_corners=False),
        _CONV[dims](in_ch, out_ch, kernel_size=1),
    )


class ConvBlock(nn.Module):
    """Two (3×3 conv → norm → ReLU), dropout between them; optionally residual.

    The residual form adds a shortcut (identity, or 1×1 conv + norm when the channel count
    changes) before the second ReLU, as in ResNet. Convs have no bias when a norm follows.
    ReLUs are not in-place so that backward hooks (Grad-CAM) may sit on any layer.
    """

    def __init__(self, dims: int, in_ch: int, out_ch: int, norm: str, dropout: float, residual: bool):
        super().__init__()
        conv, bias = _CONV[dims], norm == "none"
        self.conv1 = conv(in_ch, out_ch, kernel_size=3, padding=1, bias=bias)
        self.norm1 = _norm(norm, dims, out_ch)
        self.drop = _DROPOUT[dims](dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(out_ch, out_ch, kernel_size=3, padding=1, bias=bias)
        self.norm2 = _norm(norm, dims, out_ch)
        self.act = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if residual:
            self.shortcut = (
                nn.Identity()
                if in_ch == out_ch
                else nn.Sequential(conv(in_ch, out_ch, kernel_size=1, bias=bias), _norm(norm, dims, out_ch))
            )

    @staticmethod
    def conv_norm_pairs() -> tuple[tuple[str, str], ...]:
        """The conv → norm pairs inference may fold into one convolution (:func:`.engine.acceleration.fold_batchnorm`)."""
        return (("conv1", "norm1"), ("conv2", "norm2"))

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(self.drop(y)))
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return self.act(y)


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018): ``x · σ(ψ(ReLU(W_x x + W_g g + b_g)) + b_ψ)``.

    The gating signal ``g`` is the decoder feature *after* up-sampling, so it already has the
    skip's resolution and channel count and the coefficients need no resampling (the variant
    used by most implementations, e.g. MONAI's ``AttentionUnet``).
    """

    def __init__(self, dims: int, channels: int):
        super().__init__()
        inter = max(channels // 2, 1)
        conv = _CONV[dims]
        self.w_x = conv(channels, inter, kernel_size=1, bias=False)
        self.w_g = conv(channels, inter, kernel_size=1)
        self.psi = conv(inter, 1, kernel_size=1)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        alpha = torch.sigmoid(self.psi(torch.relu(self.w_x(x) + self.w_g(g))))
        return x * alpha


class DecoderStage(nn.Module):
    """Up-sample the coarser input, concatenate it after the same-level skips, run a ConvBlock.

    With one skip this is a U-Net decoder stage; with ``n_skips = j`` it is UNet++ node X^{i,j}.
    """

    def __init__(
        self,
        dims: int,
        in_ch: int,
        out_ch: int,
        n_skips: int,
        norm: str,
        upsample: str,
        dropout: float,
        residual: bool = False,
        attention: bool = False,
    ):
        super().__init__()
        self.up = _upsample(dims, in_ch, out_ch, upsample)
        self.gate = AttentionGate(dims, out_ch) if attention else None
        self.block = ConvBlock(dims, out_ch * (n_skips + 1), out_ch, norm, dropout, residual)

    def forward(self, x: Tensor, skips: Sequence[Tensor]) -> Tensor:
        x = self.up(x)
        if self.gate is not None:
            skips = [self.gate(s, x) for s in skips]
        return self.block(torch.cat([*skips, x], dim=1))


class _SegmentationNet(nn.Module):
    """Shared argument checks, input checks and deep-supervision output handling."""

    default_cam_layer: str = "decoder.0"
    aux_heads: nn.ModuleList | None  # 1×1 heads for deep supervision; None without it

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        base_channels: int,
        depth: int,
        norm: str,
        upsample: str,
        dropout: float,
        deep_supervision: bool,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("base_channels", base_channels), ("depth", depth)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {UPSAMPLES}, got {upsample!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.deep_supervision = deep_supervision
        self.channels = [base_channels * 2**i for i in range(depth + 1)]
        self.pool = _POOL[spatial_dims](kernel_size=2)

    @property
    def size_divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this (``2**depth``)."""
        return 2**self.depth

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"expected a {self.spatial_dims + 2}-D tensor (N, C, {'D, ' if self.spatial_dims == 3 else ''}H, W), "
                f"got shape {tuple(x.shape)}"
            )
        size = tuple(x.shape[2:])
        d = self.size_divisor
        if any(s % d for s in size):
            padded = tuple(-(-s // d) * d for s in size)
            raise ValueError(
                f"input spatial size {size} is not divisible by {d} (2**depth, depth={self.depth}); "
                f"pad it, e.g. to {padded}"
            )

    def _add_unet_decoder(self, norm: str, upsample: str, dropout: float, residual: bool = False,
                          attention: bool = False) -> None:
        """A U-Net's ``decoder`` (one stage per level, deepest first), ``out_conv`` and, with deep
        supervision, ``aux_heads`` (``aux_heads[k]`` reads decoder level k + 1, resolution 1/2**(k+1))."""
        dims, ch, depth = self.spatial_dims, self.channels, self.depth
        self.decoder = nn.ModuleList(
            DecoderStage(dims, ch[level + 1], ch[level], 1, norm, upsample, dropout, residual, attention)
            for level in reversed(range(depth))
        )
        self.out_conv = _CONV[dims](ch[0], self.out_channels, kernel_size=1)
        self.aux_heads = nn.ModuleList(
            _CONV[dims](ch[level], self.out_channels, kernel_size=1) for level in range(1, depth)
        ) if self.deep_supervision else None

    def _decode(self, x: Tensor, skips: Sequence[Tensor]) -> Tensor | list[Tensor]:
        """U-Net decoding of the bottleneck features ``x`` with the per-level ``skips`` (shallowest first)."""
        features = []
        for stage, skip in zip(self.decoder, reversed(skips)):
            x = stage(x, [skip])
            features.append(x)
        return self._outputs(self.out_conv(x), features[-2::-1])

    def _outputs(self, logits: Tensor, aux_features: Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Logits alone, or in training with deep supervision ``[logits, *aux_logits]``."""
        if not (self.deep_supervision and self.training):
            return logits
        return [logits, *(head(f) for head, f in zip(self.aux_heads, aux_features))]


class UNet(_SegmentationNet):
    """Configurable U-Net (Ronneberger et al. 2015) for 2D, 2.5D and 3D.

    ``depth`` 2× down-samplings; channels ``base_channels · 2**level``, so the bottleneck has
    ``base · 2**depth``. ``block="residual"`` gives a residual U-Net, ``attention=True`` puts
    additive attention gates on the skips (Attention U-Net). For 2.5D, use ``spatial_dims=2``
    with ``in_channels = channels × neighbouring slices``.

    Deep supervision: in training mode ``forward`` returns ``[logits, aux_1, …, aux_{depth-1}]``
    where ``aux_k`` has 1/2**k of the input resolution (the loss down-samples the target);
    in eval mode it returns only the full-resolution logits.

    ``encoder[i]`` is level ``i`` (before pooling), ``decoder[0]`` the first stage after the
    bottleneck, ``decoder[-1]`` the last before ``out_conv``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "batch",
        upsample: str = "transpose",
        dropout: float = 0.0,
        deep_supervision: bool = False,
        block: str = "plain",
        attention: bool = False,
    ):
        super().__init__(spatial_dims, in_channels, out_channels, base_channels, depth, norm, upsample,
                         dropout, deep_supervision)
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        dims, ch, residual = spatial_dims, self.channels, block == "residual"
        self.encoder = nn.ModuleList(
            ConvBlock(dims, in_channels if i == 0 else ch[i - 1], ch[i], norm, dropout, residual)
            for i in range(depth)
        )
        self.bottleneck = ConvBlock(dims, ch[depth - 1], ch[depth], norm, dropout, residual)
        self._add_unet_decoder(norm, upsample, dropout, residual, attention)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        self._check_input(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        return self._decode(self.bottleneck(x), skips)


class UNetPlusPlus(_SegmentationNet):
    """UNet++ (Zhou et al. 2018): U-Net whose skips are nested, densely connected decoders.

    Node X^{i,j} (level ``i``, column ``j``) sees X^{i,0..j-1} and the up-sampled X^{i+1,j-1}.
    ``encoder[i]`` is X^{i,0}, ``bottleneck`` X^{depth,0}; ``decoder`` holds the nodes with
    ``j ≥ 1`` column by column, deepest first within a column: X^{depth-1,1}, …, X^{0,1},
    X^{depth-2,2}, …, X^{0,depth}. So ``decoder[0]`` = X^{depth-1,1}, the node that consumes
    the bottleneck (the same place as a U-Net's ``decoder.0``, hence ``default_cam_layer``),
    and ``decoder[-1]`` = X^{0,depth} feeds ``out_conv``.

    Deep supervision (as in the paper): in training mode ``forward`` returns
    ``[logits(X^{0,depth}), logits(X^{0,depth-1}), …, logits(X^{0,1})]``, all at full resolution;
    in eval mode only the first.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "batch",
        upsample: str = "transpose",
        dropout: float = 0.0,
        deep_supervision: bool = False,
    ):
        super().__init__(spatial_dims, in_channels, out_channels, base_channels, depth, norm, upsample,
                         dropout, deep_supervision)
        dims, ch = spatial_dims, self.channels
        self.encoder = nn.ModuleList(
            ConvBlock(dims, in_channels if i == 0 else ch[i - 1], ch[i], norm, dropout, False)
            for i in range(depth)
        )
        self.bottleneck = ConvBlock(dims, ch[depth - 1], ch[depth], norm, dropout, False)
        self.decoder = nn.ModuleList(
            DecoderStage(dims, ch[i + 1], ch[i], j, norm, upsample, dropout)
            for j, i in self._node_order(depth)
        )
        self.out_conv = _CONV[dims](ch[0], out_channels, kernel_size=1)
        # aux_heads[k] reads X^{0, depth-1-k}.
        self.aux_heads = nn.ModuleList(
            _CONV[dims](ch[0], out_channels, kernel_size=1) for _ in range(depth - 1)
        ) if deep_supervision else None

    @staticmethod
    def _node_order(depth: int) -> list[tuple[int, int]]:
        """(column j, level i) of ``decoder[k]``, in an order where every input is ready."""
        return [(j, i) for j in range(1, depth + 1) for i in reversed(range(depth - j + 1))]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        self._check_input(x)
        nodes: list[list[Tensor]] = []  # nodes[i][j] = X^{i,j}
        for stage in self.encoder:
            x = stage(x)
            nodes.append([x])
            x = self.pool(x)
        nodes.append([self.bottleneck(x)])
        for stage, (j, i) in zip(self.decoder, self._node_order(self.depth)):
            nodes[i].append(stage(nodes[i + 1][j - 1], nodes[i]))
        top = nodes[0]
        return self._outputs(self.out_conv(top[-1]), top[-2:0:-1])


class MultiPathUNet(_SegmentationNet):
    """One encoder path per input modality, fused at every level before a shared U-Net decoder.

    After the multi-path idea of Dense Multi-path U-Net (Dolz et al. 2018, ISLES perfusion), without
    its cross-path dense connections: input channels are split into ``paths`` contiguous groups
    (one modality each; for 2.5D a modality's neighbouring slices stay together, as
    :func:`..engine.inference.slice_with_context` stacks them), each group has its own encoder of ``path_channels ·
    2**level`` channels, and at every level (skips and bottleneck) the paths' features are
    concatenated and fused by a 1×1 convolution (+ norm + ReLU) to the decoder's ``base · 2**level``
    channels. ``paths`` defaults to one path per input channel; ``path_channels`` to ``base // 2``,
    which keeps the parameter count close to an early-fusion U-Net of the same base.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "batch",
        upsample: str = "transpose",
        dropout: float = 0.0,
        deep_supervision: bool = False,
        paths: int | None = None,
        path_channels: int | None = None,
    ):
        super().__init__(spatial_dims, in_channels, out_channels, base_channels, depth, norm, upsample,
                         dropout, deep_supervision)
        paths = in_channels if paths is None else paths
        if not isinstance(paths, int) or paths < 1 or in_channels % paths:
            raise ValueError(f"paths must be a positive divisor of in_channels ({in_channels}), got {paths!r}")
        pc = max(1, base_channels // 2) if path_channels is None else path_channels
        if not isinstance(pc, int) or pc < 1:
            raise ValueError(f"path_channels must be a positive integer, got {path_channels!r}")
        dims, ch, group = spatial_dims, self.channels, in_channels // paths
        pch = [pc * 2**i for i in range(depth + 1)]
        self.paths = paths
        self.path_encoders = nn.ModuleList(
            nn.ModuleList(ConvBlock(dims, group if i == 0 else pch[i - 1], pch[i], norm, dropout, False) for i in range(depth))
            for _ in range(paths)
        )
        self.path_bottlenecks = nn.ModuleList(ConvBlock(dims, pch[depth - 1], pch[depth], norm, dropout, False) for _ in range(paths))
        def fusion(level: int) -> nn.Module:
            return nn.Sequential(_CONV[dims](paths * pch[level], ch[level], kernel_size=1, bias=norm == "none"),
                                 _norm(norm, dims, ch[level]), nn.ReLU())

        self.fuse = nn.ModuleList(fusion(level) for level in range(depth))  # the skips
        self.bottleneck = fusion(depth)  # the paths' bottlenecks, fused
        self._add_unet_decoder(norm, upsample, dropout)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        self._check_input(x)
        per_level: list[list[Tensor]] = [[] for _ in range(self.depth + 1)]
        for xp, encoder, bottleneck in zip(torch.split(x, self.in_channels // self.paths, dim=1),
                                           self.path_encoders, self.path_bottlenecks):
            for level, stage in enumerate(encoder):
                xp = stage(xp)
                per_level[level].append(xp)
                xp = self.pool(xp)
            per_level[self.depth].append(bottleneck(xp))
        skips = [f(torch.cat(feats, dim=1)) for f, feats in zip(self.fuse, per_level)]
        return self._decode(self.bottleneck(torch.cat(per_level[self.depth], dim=1)), skips)


NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "unet": UNet,
    "attention_unet": partial(UNet, attention=True),
    "residual_unet": partial(UNet, block="residual"),
    "unetplusplus": UNetPlusPlus,
    "multipath_unet": MultiPathUNet,
}


def build_network(architecture: str, **kwargs: Any) -> nn.Module:
    """Build a registered network; every argument problem is a ValueError naming it.

    Arguments fixed by the variant (``attention`` for ``attention_unet``, ``block`` for
    ``residual_unet``) cannot be passed.
    """
    if architecture not in NETWORKS:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(NETWORKS)}")
    factory = NETWORKS[architecture]
    fixed = factory.keywords if isinstance(factory, partial) else {}
    params = {name: p for name, p in inspect.signature(factory).parameters.items() if name not in fixed}
    for key in kwargs:
        if key not in params:
            raise ValueError(
                f"{architecture!r} does not take argument {key!r}; it takes: {', '.join(params)}"
            )
    missing = [name for name, p in params.items() if p.default is p.empty and name not in kwargs]
    if missing:
        raise ValueError(f"{architecture!r} needs argument(s): {', '.join(missing)}")
    return factory(**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe_variants(
    spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, **kwargs: Any
) -> dict[str, int]:
    """Trainable parameter count of every registered network for one config (for the model card).

    Built on the ``meta`` device, so even large configs cost no memory or init time.
    """
    with torch.device("meta"):
        return {
            name: count_parameters(build_network(name, spatial_dims=spatial_dims, in_channels=in_channels,
                                                 out_channels=out_channels, **kwargs))
            for name in NETWORKS
        }
