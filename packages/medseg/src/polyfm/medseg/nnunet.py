"""nnU-Net v2 checkpoints (``checkpoint_final.pth``) as polyfm's ``DynUNet``.

nnU-Net v2 saves ``{"network_weights": ..., "init_args": {"plans": ..., "configuration": ...},
"trainer_name": ...}`` with the network in dynamic-network-architectures' layout. Its default
network, ``PlainConvUNet``, is the U-Net MONAI's ``DynUNet`` builds, module for module:

==========================================  ===========================================
nnU-Net (``PlainConvUNet``)                 ``DynUNet`` (``res_block=False``)
==========================================  ===========================================
``encoder.stages.0.0.convs.{0,1}``          ``input_block.conv{1,2}`` / ``norm{1,2}``
``encoder.stages.{s}.0.convs.*``            ``downsamples.{s-1}.*`` (the last stage: ``bottleneck``)
``decoder.transpconvs.{d}``                 ``upsamples.{d}.transp_conv.conv`` (``trans_bias=True``)
``decoder.stages.{d}.convs.*``              ``upsamples.{d}.conv_block.*``
``decoder.seg_layers.{n-2}`` (full size)    ``output_block.conv.conv``
``decoder.seg_layers.{n-3-i}``              ``deep_supervision_heads.{i}``
==========================================  ===========================================

Two differences are handled, not ignored: nnU-Net's convolutions carry biases and DynUNet's do
not, but each feeds an instance norm, which subtracts the per-channel mean, so the biases have no
effect on any output and are dropped (said in the log); and DynUNet's decoder block ``d`` uses the
kernel of the stage below it where nnU-Net v2 uses the skip's, which only agree when the two
kernels are equal (isotropic plans; anisotropic ones are refused, naming the stage). The
architecture is read from the weights' shapes and checked against the plans when they are there;
residual-encoder U-Nets (``ResidualEncoderUNet``, the ResEnc presets) and other networks are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from polyfm.core.errors import CheckpointError

log = logging.getLogger(__name__)


def is_nnunet_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    weights = checkpoint.get("network_weights")
    markers = ("init_args" in checkpoint, "trainer_name" in checkpoint)
    return isinstance(weights, Mapping) and (any(markers) or any(str(k).startswith(("encoder.stages.", "decoder.seg_layers.")) for k in weights))


def _architecture(checkpoint: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(network class name, arch kwargs) from the plans saved in ``init_args``; (None, {}) without plans."""
    init = checkpoint.get("init_args")
    if not isinstance(init, Mapping):
        return None, {}
    plans = init.get("plans")
    if not isinstance(plans, Mapping) or not isinstance(plans.get("configurations"), Mapping):
        return None, {}
    configurations, name = plans["configurations"], init.get("configuration")
    configuration: dict[str, Any] = {}
    seen = set()
    while isinstance(name, str) and name in configurations and name not in seen:  # inherits_from, child keys win
        seen.add(name)
        configuration = {**configurations[name], **configuration}
        name = configurations[name].get("inherits_from")
    architecture = configuration.get("architecture")
    if isinstance(architecture, Mapping):
        return str(architecture.get("network_class_name", "")), dict(architecture.get("arch_kwargs") or {})
    if "UNet_class_name" in configuration:  # plans written before nnU-Net v2.4
        return str(configuration["UNet_class_name"]), {}
    return None, {}


def convert_nnunet(checkpoint: Mapping[str, Any], source: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(DynUNet constructor arguments, DynUNet state dict) for an nnU-Net v2 ``PlainConvUNet`` checkpoint."""

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{source}: an nnU-Net checkpoint ({checkpoint.get('trainer_name', 'unknown trainer')}) that DynUNet cannot hold: {why}")

    name, arch = _architecture(checkpoint)
    if name and not name.endswith("PlainConvUNet"):
        raise refuse(
            f"its network is {name}. Only PlainConvUNet (nnU-Net's default) maps onto DynUNet; residual-encoder "
            "U-Nets have blocks DynUNet does not build. Run it with nnU-Net itself (nnUNetv2_predict)."
        )
    if arch.get("nonlin_first"):
        raise refuse("nonlin_first=True puts the activation before the norm; DynUNet normalises first.")
    if arch.get("norm_op") and "InstanceNorm" not in str(arch["norm_op"]):
        raise refuse(f"norm_op is {arch['norm_op']}; the conversion needs instance norms (they make nnU-Net's conv biases inert).")
    if arch.get("nonlin") and "LeakyReLU" not in str(arch["nonlin"]):
        raise refuse(f"nonlin is {arch['nonlin']}; DynUNet here is built with nnU-Net's LeakyReLU.")
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in checkpoint["network_weights"].items()}
    n = len({k.split(".")[2] for k in weights if k.startswith("encoder.stages.")})
    if n < 2:
        raise refuse("no encoder.stages.* weights were found.")

    def block(prefix: str) -> list[str]:
        """The conv prefixes of one StackedConvBlocks; DynUNet's blocks hold exactly two."""
        convs = sorted({k[len(prefix + ".convs.") :].split(".")[0] for k in weights if k.startswith(prefix + ".convs.")}, key=int)
        if len(convs) != 2:
            raise refuse(f"{prefix} has {len(convs)} convolutions (n_conv_per_stage); DynUNet's blocks have two.")
        for c in convs:
            if f"{prefix}.convs.{c}.norm.weight" not in weights:
                raise refuse(f"{prefix}.convs.{c} has no affine norm after its convolution.")
        return [f"{prefix}.convs.{c}" for c in convs]

    encoder = [block(f"encoder.stages.{s}.0") for s in range(n)]  # '.0': no pooling module before the convs (pool='conv')
    kernels = [list(weights[f"{convs[0]}.conv.weight"].shape[2:]) for convs in encoder]
    features = [int(weights[f"{convs[0]}.conv.weight"].shape[0]) for convs in encoder]
    spatial_dims = len(kernels[0])
    # the transposed convolution of decoder stage d (deepest first) has kernel = stride of encoder stage n-1-d
    planned = [list(s) if isinstance(s, list | tuple) else [int(s)] * spatial_dims for s in arch.get("strides") or []]
    strides = [planned[0] if planned else [1] * spatial_dims]  # stage 0 leaves no trace in the weights; nnU-Net plans 1
    strides += [list(weights[f"decoder.transpconvs.{n - 1 - s}.weight"].shape[2:]) for s in range(1, n)]
    if planned and planned != strides:
        raise refuse(f"the plans' strides {arch['strides']} do not match the weights' {strides}.")
    decoder = [block(f"decoder.stages.{d}") for d in range(n - 1)]
    for d, convs in enumerate(decoder):
        kernel = list(weights[f"{convs[0]}.conv.weight"].shape[2:])
        if kernel != kernels[n - 1 - d]:
            raise refuse(
                f"decoder stage {d} uses kernel {kernel} (its skip's) but DynUNet's matching block uses the deeper "
                f"stage's {kernels[n - 1 - d]}: this anisotropic plan has no DynUNet equivalent."
            )
    norm_kwargs = dict(arch.get("norm_op_kwargs") or {"eps": 1e-5, "affine": True})
    slope = float((arch.get("nonlin_kwargs") or {}).get("negative_slope", 0.01))
    trans_bias = "decoder.transpconvs.0.bias" in weights
    config = {
        "spatial_dims": spatial_dims, "in_channels": int(weights[f"{encoder[0][0]}.conv.weight"].shape[1]),
        "out_channels": int(weights[f"decoder.seg_layers.{n - 2}.weight"].shape[0]), "kernel_size": kernels,
        "strides": strides, "upsample_kernel_size": strides[1:], "filters": features,
        "norm_name": ("INSTANCE", {"affine": bool(norm_kwargs.get("affine", True)), "eps": float(norm_kwargs.get("eps", 1e-5))}),
        "act_name": ("leakyrelu", {"inplace": True, "negative_slope": slope}), "res_block": False, "trans_bias": trans_bias,
    }  # fmt: skip

    state: dict[str, torch.Tensor] = {}
    dropped_biases = 0

    def take(convs: list[str], target: str) -> None:
        nonlocal dropped_biases
        for i, conv in enumerate(convs, start=1):
            state[f"{target}.conv{i}.conv.weight"] = weights[f"{conv}.conv.weight"]
            state[f"{target}.norm{i}.weight"] = weights[f"{conv}.norm.weight"]
            state[f"{target}.norm{i}.bias"] = weights[f"{conv}.norm.bias"]
            dropped_biases += f"{conv}.conv.bias" in weights  # inert: the instance norm removes it

    for s, convs in enumerate(encoder):
        take(convs, "input_block" if s == 0 else "bottleneck" if s == n - 1 else f"downsamples.{s - 1}")
    for d, convs in enumerate(decoder):
        take(convs, f"upsamples.{d}.conv_block")
        state[f"upsamples.{d}.transp_conv.conv.weight"] = weights[f"decoder.transpconvs.{d}.weight"]
        if trans_bias:
            state[f"upsamples.{d}.transp_conv.conv.bias"] = weights[f"decoder.transpconvs.{d}.bias"]
    state["output_block.conv.conv.weight"] = weights[f"decoder.seg_layers.{n - 2}.weight"]
    state["output_block.conv.conv.bias"] = weights[f"decoder.seg_layers.{n - 2}.bias"]
    for i in range(n - 2):  # deep supervision, next-highest resolution first; DynUNet drops what it does not build
        state[f"deep_supervision_heads.{i}.conv.conv.weight"] = weights[f"decoder.seg_layers.{n - 3 - i}.weight"]
        state[f"deep_supervision_heads.{i}.conv.conv.bias"] = weights[f"decoder.seg_layers.{n - 3 - i}.bias"]
    if dropped_biases:
        log.info("%s: dropped %d nnU-Net convolution biases; each feeds an instance norm, so no output changes.", source, dropped_biases)
    if arch.get("dropout_op"):
        log.info("%s: the plans train with %s; the converted DynUNet has no dropout (outputs in eval mode are the same).", source, arch["dropout_op"])
    return config, state
