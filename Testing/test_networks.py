"""Networks: parameter counts, output shapes, deep supervision, Grad-CAM layer names, registry."""
from __future__ import annotations

import pytest
import torch

from UNetSegmentLib.models.networks import (
    NETWORKS,
    UNet,
    UNetPlusPlus,
    build_network,
    count_parameters,
    describe_variants,
)

ARCHS = list(NETWORKS)
SMALL = dict(base_channels=4)  # keeps every forward/backward test in milliseconds


def _input(dims: int, channels: int = 1, batch: int = 1) -> torch.Tensor:
    # 3D uses depth 3 (bottleneck 2³) and 2D depth 4 (bottleneck 2²): norms need > 1 value.
    size = (32, 32) if dims == 2 else (16, 16, 16)
    return torch.randn(batch, channels, *size)


def _depth(dims: int) -> int:
    return 4 if dims == 2 else 3


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- parameter counts ------------------------------------------------------------------------
@pytest.mark.parametrize("base, expected", [(64, 31.0e6), (32, 7.76e6), (16, 1.94e6)])
@pytest.mark.parametrize("norm", ["none", "batch"])
def test_classic_unet_parameter_count(base: int, expected: float, norm: str) -> None:
    model = UNet(2, 1, 2, base_channels=base, norm=norm, upsample="transpose")
    assert abs(count_parameters(model) - expected) / expected < 0.02


def test_classic_unet_exact_count() -> None:
    # Ronneberger et al. with padding: 18 3×3 convs, 4 2×2 up-convs, 1×1 conv to 2 classes.
    # (Keras ports often quote 31,031,685: they end in 3×3 conv to 2 + 1×1 conv to 1.)
    assert count_parameters(UNet(2, 1, 2, base_channels=64, norm="none")) == 31_030_658


def test_describe_variants() -> None:
    counts = describe_variants(base_channels=16)
    print({name: f"{n:,}" for name, n in counts.items()})
    assert list(counts) == ARCHS
    assert counts["unet"] == count_parameters(UNet(2, 1, 2, base_channels=16))
    for name in ("attention_unet", "residual_unet", "unetplusplus"):
        assert counts[name] > counts["unet"]


def test_count_parameters_counts_trainable_only() -> None:
    model = UNet(2, 1, 2, **SMALL)
    total = count_parameters(model)
    model.encoder.requires_grad_(False)
    frozen = sum(p.numel() for p in model.encoder.parameters())
    assert count_parameters(model) == total - frozen


# --- forward shapes --------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("in_ch, out_ch", [(1, 2), (4, 3)])
def test_forward_shape(arch: str, dims: int, in_ch: int, out_ch: int) -> None:
    model = build_network(arch, spatial_dims=dims, in_channels=in_ch, out_channels=out_ch,
                          depth=_depth(dims), **SMALL)
    x = _input(dims, in_ch)
    out = model(x)
    assert out.shape == (1, out_ch, *x.shape[2:])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
@pytest.mark.parametrize("upsample", ["transpose", "interpolate"])
@pytest.mark.parametrize("cls", [UNet, UNetPlusPlus])
def test_norm_and_upsample_modes(cls: type, dims: int, norm: str, upsample: str) -> None:
    model = cls(dims, 1, 2, depth=_depth(dims), norm=norm, upsample=upsample, dropout=0.1, **SMALL)
    x = _input(dims)
    assert model(x).shape == (1, 2, *x.shape[2:])
    model.eval()
    assert model(x).shape == (1, 2, *x.shape[2:])


def test_dropout_does_not_change_state_dict_keys() -> None:
    assert UNet(2, 1, 2, dropout=0.3, **SMALL).state_dict().keys() == UNet(2, 1, 2, **SMALL).state_dict().keys()


def test_variant_structure() -> None:
    def names(model: torch.nn.Module) -> set[str]:
        return {type(m).__name__ for m in model.modules()}

    assert "AttentionGate" in names(build_network("attention_unet", spatial_dims=2, in_channels=1, out_channels=2))
    assert "AttentionGate" not in names(build_network("unet", spatial_dims=2, in_channels=1, out_channels=2))
    residual = build_network("residual_unet", spatial_dims=2, in_channels=1, out_channels=2)
    assert all(b.shortcut is not None for b in [*residual.encoder, residual.bottleneck])
    # UNet++ depth 4 has 4 + 3 + 2 + 1 nested decoder nodes.
    assert len(UNetPlusPlus(2, 1, 2, depth=4).decoder) == 10


# --- deep supervision ------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_deep_supervision(arch: str, dims: int) -> None:
    depth = _depth(dims)
    model = build_network(arch, spatial_dims=dims, in_channels=1, out_channels=2, depth=depth,
                          deep_supervision=True, **SMALL)
    x = _input(dims)
    size = x.shape[2]
    outs = model.train()(x)
    assert isinstance(outs, list) and len(outs) == depth
    if arch == "unetplusplus":  # nested decoders all end at full resolution
        expected = [size] * depth
    else:
        expected = [size // 2**k for k in range(depth)]
    assert [o.shape for o in outs] == [torch.Size([1, 2, *[s] * dims]) for s in expected]
    out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, *x.shape[2:])


def test_no_deep_supervision_returns_tensor_in_training() -> None:
    assert isinstance(UNet(2, 1, 2, **SMALL).train()(_input(2)), torch.Tensor)


# --- Grad-CAM layer, gradients ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_default_cam_layer_follows_bottleneck(arch: str) -> None:
    model = build_network(arch, spatial_dims=2, in_channels=1, out_channels=2, **SMALL)
    layer = model.get_submodule(model.default_cam_layer)
    assert model.default_cam_layer == "decoder.0"
    assert layer is model.decoder[0]
    calls: list[tuple[str, torch.Size]] = []
    model.bottleneck.register_forward_hook(lambda m, i, o: calls.append(("bottleneck", o.shape)))
    layer.register_forward_hook(lambda m, i, o: calls.append(("cam", o.shape)))
    model(_input(2))
    assert [c[0] for c in calls] == ["bottleneck", "cam"]
    assert calls[1][1][2:] == (32 // 2 ** (model.depth - 1),) * 2  # one level above the bottleneck


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_backward_reaches_every_parameter(arch: str, dims: int) -> None:
    model = build_network(arch, spatial_dims=dims, in_channels=1, out_channels=2, depth=_depth(dims),
                          deep_supervision=True, **SMALL)
    x = _input(dims).requires_grad_(True)
    sum(o.square().mean() for o in model(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_grad_cam_hooks_on_decoder_layer() -> None:
    model = UNet(2, 1, 2, **SMALL).eval()
    grads: list[torch.Tensor] = []
    layer = model.get_submodule("decoder.0.block.conv2")
    layer.register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    model(_input(2))[:, 1].sum().backward()
    assert grads and grads[0].shape[1] == model.channels[model.depth - 1]


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_name_their_conv_norm_pairs_for_folding(arch: str) -> None:
    """Every conv → norm pair a block lists (the hook BatchNorm folding uses) exists, in that order of
    computation, and every BatchNorm of a block that lists pairs is covered."""
    model = build_network(arch, spatial_dims=2, in_channels=1, out_channels=2, norm="batch", **SMALL)
    blocks = [m for m in model.modules() if callable(getattr(m, "conv_norm_pairs", None))]
    assert blocks, "the network's convolution blocks name their pairs"
    for block in blocks:
        named = {n for pair in block.conv_norm_pairs() for n in pair}
        for conv_name, norm_name in block.conv_norm_pairs():
            conv, norm = getattr(block, conv_name), getattr(block, norm_name)
            assert isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d)
            assert norm.num_features == conv.out_channels
        direct = {n for n, m in block.named_children() if isinstance(m, torch.nn.BatchNorm2d)}
        assert direct <= named


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_size_divisor_is_two_to_the_depth(depth: int) -> None:
    model = UNet(2, 1, 2, depth=depth, **SMALL)
    assert model.size_divisor == 2**depth
    assert model(torch.randn(1, 1, 2**depth, 3 * 2**depth)).shape == (1, 2, 2**depth, 3 * 2**depth)


# --- argument and input errors ---------------------------------------------------------------
@pytest.mark.parametrize("cls", [UNet, UNetPlusPlus])
def test_indivisible_input_size_is_a_clear_error(cls: type) -> None:
    model = cls(2, 1, 2, depth=4, **SMALL)
    with pytest.raises(ValueError, match=r"not divisible by 16.*pad it, e.g. to \(32, 48\)"):
        model(torch.randn(1, 1, 30, 40))
    with pytest.raises(ValueError, match="expected a 4-D tensor"):
        model(torch.randn(1, 1, 16, 16, 16))


def test_build_network_errors() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'vnet'.*unet, attention_unet"):
        build_network("vnet", spatial_dims=2, in_channels=1, out_channels=2)
    with pytest.raises(ValueError, match="'base_chanels'"):
        build_network("unet", spatial_dims=2, in_channels=1, out_channels=2, base_chanels=8)
    with pytest.raises(ValueError, match="'attention'"):  # fixed by the variant
        build_network("attention_unet", spatial_dims=2, in_channels=1, out_channels=2, attention=False)
    with pytest.raises(ValueError, match="'block'"):  # UNet++ has no residual form
        build_network("unetplusplus", spatial_dims=2, in_channels=1, out_channels=2, block="residual")
    with pytest.raises(ValueError, match="out_channels"):
        build_network("unet", spatial_dims=2, in_channels=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spatial_dims=1), "spatial_dims"),
        (dict(norm="layer"), "norm"),
        (dict(upsample="nearest"), "upsample"),
        (dict(block="dense"), "block"),
        (dict(dropout=1.0), "dropout"),
        (dict(depth=0), "depth"),
        (dict(base_channels=2.5), "base_channels"),
    ],
)
def test_bad_values_are_value_errors(kwargs: dict, match: str) -> None:
    args = dict(spatial_dims=2, in_channels=1, out_channels=2) | kwargs
    with pytest.raises(ValueError, match=match):
        build_network("unet", **args)


# --- multi-path (one encoder per modality) ---------------------------------------------------
def test_multipath_keeps_modalities_apart_until_fusion() -> None:
    """Each path sees only its group of input channels: a change in group 2 reaches path 2's encoder
    features and no other path's, and the fused output does change."""
    from UNetSegmentLib.models.networks import MultiPathUNet

    net = MultiPathUNet(2, 12, 2, base_channels=8, depth=2, paths=4).eval()
    feats: dict[int, torch.Tensor] = {}
    for p, enc in enumerate(net.path_encoders):
        enc[0].register_forward_hook(lambda m, i, o, p=p: feats.__setitem__(p, o.detach().clone()))
    x = torch.randn(1, 12, 16, 16)
    y0 = net(x)
    before = dict(feats)
    x2 = x.clone()
    x2[:, 6:9] += 1.0  # group 2 = channels 6, 7, 8
    y1 = net(x2)
    changed = [p for p in range(4) if not torch.equal(before[p], feats[p])]
    assert changed == [2]
    assert not torch.allclose(y0, y1)


def test_multipath_defaults_and_errors() -> None:
    from UNetSegmentLib.models.networks import MultiPathUNet

    assert MultiPathUNet(2, 4, 2, base_channels=8, depth=2).paths == 4, "default: one path per input channel"
    with pytest.raises(ValueError, match="paths must be a positive divisor"):
        MultiPathUNet(2, 12, 2, paths=5)
    early = count_parameters(UNet(2, 12, 2, base_channels=16))
    multi = count_parameters(MultiPathUNet(2, 12, 2, base_channels=16, paths=4))
    assert 0.8 < multi / early < 1.25, "comparable size to the early-fusion U-Net of the same base"
    out = build_network("multipath_unet", spatial_dims=3, in_channels=2, out_channels=3, base_channels=4, depth=2)(
        torch.randn(1, 2, 8, 8, 8))
    assert out.shape == (1, 3, 8, 8, 8)
