"""Network factory: the same constructor arguments build the network on the server (persistor) and at sites.

`SegNetwork` wraps a MONAI network so that a FLARE persistor can build it from a class path plus plain JSON
arguments; its state_dict keys are "net.<monai keys>" everywhere, so server and sites always agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet, SegResNet, UNet
from torch import nn

ARCHITECTURES = ("unet", "segresnet", "dynunet")
# FedSeg's own names for MONAI norm settings that a plain string cannot say. MONAI's "instance" builds
# InstanceNorm with affine=False: no normalization parameters at all (FedBN needs some, see norm_state_keys).
NORM_ALIASES = {"instance_affine": ("instance", {"affine": True})}
# module types whose parameters and buffers are "normalization" (InstanceNorm and BatchNorm derive from _NormBase)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def monai_norm(norm: str | Sequence):
    """The MONAI norm argument of a FedSeg norm setting ("instance_affine" -> ("instance", {"affine": True}))."""
    return NORM_ALIASES.get(norm, norm) if isinstance(norm, str) else norm


def norm_state_keys(module: nn.Module) -> list[str]:
    """The state_dict keys that belong to normalization layers (affine weight/bias, running statistics),
    decided by each submodule's type, never by its name. Sorted; empty when the network has none."""
    keys = []
    for name, sub in module.named_modules():
        if isinstance(sub, NORM_TYPES):
            keys += [f"{name}.{key}" if name else key for key in sub.state_dict()]
    return sorted(keys)


def network_norm_keys(network_args: dict) -> list[str]:
    """norm_state_keys of the SegNetwork these arguments build."""
    return norm_state_keys(SegNetwork(**network_args))


def build_segmentation_network(
    arch: str = "unet",
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 2,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] | None = None,
    num_res_units: int = 1,
    norm: str = "instance",
    dropout: float = 0.0,
) -> nn.Module:
    """A MONAI segmentation network. `channels` are the feature widths per level for every architecture.

    Instance norm is the default: BatchNorm running statistics average poorly across non-iid hospitals.
    norm: a MONAI norm name, or "instance_affine" (instance norm with a learned weight and bias per channel).
    """
    arch = arch.lower()
    norm = monai_norm(norm)
    channels = tuple(int(c) for c in channels)
    if len(channels) < 2:
        raise ValueError(f"network needs at least 2 levels in 'channels', got {channels}")
    strides = tuple(strides) if strides is not None else (2,) * (len(channels) - 1)
    if arch == "unet":
        return UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            num_res_units=num_res_units,
            norm=norm,
            dropout=dropout,
        )
    if arch == "segresnet":
        # SegResNet doubles its width per level from init_filters; its depth follows len(channels).
        blocks_down = tuple([1] + [2] * (len(channels) - 1))
        return SegResNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            init_filters=channels[0],
            blocks_down=blocks_down,
            blocks_up=(1,) * (len(channels) - 1),
            norm=norm,
            dropout_prob=dropout or None,
        )
    if arch == "dynunet":
        kernels = [3] * len(channels)
        dyn_strides = [1] + list(strides)
        return DynUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernels,
            strides=dyn_strides,
            upsample_kernel_size=dyn_strides[1:],
            filters=channels,
            norm_name=norm,
            dropout=dropout or None,
            res_block=num_res_units > 0,
        )
    raise ValueError(f"unknown network arch {arch!r}; choose one of {ARCHITECTURES}")


class SegNetwork(nn.Module):
    """The segmentation network of a FedSeg job (see build_segmentation_network for the arguments)."""

    def __init__(self, **network_args):
        super().__init__()
        self.network_args = dict(network_args)
        self.net = build_segmentation_network(**network_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
