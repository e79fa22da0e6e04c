"""Runtime speed-ups, each exact up to float rounding and tested against the plain path
(``Testing/test_acceleration.py``), with a measured gain (``bench/inference_vs_monai.py``). Where the
windows go (body-only regions, fitted windows) is :mod:`.windows`' business, not this module's.

* :func:`default_threads` / :func:`usable_cores` — the cores this process may really use.
* :func:`fold_batchnorm` — eval-mode BatchNorm folded into the convolution before it: one pass over
  each activation map instead of two. Blocks name their conv → norm pairs themselves
  (``conv_norm_pairs()``, see :class:`.models.networks.ConvBlock`); ``Sequential`` conv → BN pairs
  are found by position.
* :func:`prepare_network` — the folded network in the channels-last (NHWC/NDHWC) layout that
  oneDNN's CPU convolutions, bf16 ones above all, run fastest on; it converts its input itself.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path


def usable_cores() -> int:
    """CPU cores this process may really use: its affinity mask, capped by a cgroup CPU quota (a
    container started with ``--cpus 2`` on a 64-core host must not run 64 threads)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        try:
            text = Path(path).read_text().split()
        except OSError:
            continue
        try:
            if path.endswith("cpu.max") and text[0] != "max":
                n = min(n, math.ceil(int(text[0]) / int(text[1])))
            elif path.endswith("quota_us") and int(text[0]) > 0:
                period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
                n = min(n, math.ceil(int(text[0]) / period))
        except (ValueError, IndexError, OSError):
            pass
        break
    return max(1, n)


_DEFAULT_THREADS: list[int] = []


def default_threads() -> int:
    """torch's own default thread count (physical cores, or ``OMP_NUM_THREADS``) as first seen in this
    process, capped by :func:`usable_cores`; what a run uses when no thread count is asked for."""
    import torch

    if not _DEFAULT_THREADS:
        _DEFAULT_THREADS.append(torch.get_num_threads())
    return max(1, min(_DEFAULT_THREADS[0], usable_cores()))


def fold_batchnorm(network):
    """A copy of ``network`` in eval mode with every BatchNorm that directly follows a convolution
    folded into it (the pairs a block lists in ``conv_norm_pairs()``, and ``Sequential`` conv → BN)."""
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(network).eval()
    convs = (nn.Conv2d, nn.Conv3d)
    bns = (nn.BatchNorm2d, nn.BatchNorm3d)
    for module in list(net.modules()):
        pairs: list[tuple[str, str]] = []
        if isinstance(module, nn.Sequential):
            names = [n for n, _ in module.named_children()]
            pairs = [(a, b) for a, b in zip(names, names[1:])]
        elif callable(getattr(module, "conv_norm_pairs", None)):  # a block that names its pairs
            pairs = list(module.conv_norm_pairs())
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, convs) and isinstance(bn, bns) and bn.track_running_stats and bn.running_mean is not None:
                with torch.no_grad():
                    setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return net


def memory_format(spatial_dims: int):
    import torch

    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def prepare_network(network, spatial_dims: int, device):
    """The inference form of ``network``: BatchNorm folded, channels-last (its input converted on entry
    by a pre-forward hook, so callers feed ordinary tensors), on ``device``, eval mode. Layer names
    are kept (Grad-CAM finds its layer). The original is not modified."""
    fmt = memory_format(spatial_dims)
    net = fold_batchnorm(network).to(device=device, memory_format=fmt).eval()
    net.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(memory_format=fmt), *args[1:]))
    return net
