"""The medical segmentation models: MONAI networks in the polyfm encoder contract.

``MODELS`` is the ``polyfm.models`` entry point (name -> class)."""

from polyfm.medseg.models.base import MedSegNet
from polyfm.medseg.models.basic_unet import BasicUNet
from polyfm.medseg.models.dynunet import DynUNet
from polyfm.medseg.models.mednext import MedNeXt
from polyfm.medseg.models.segresnet import SegResNet
from polyfm.medseg.models.swin_unetr import SwinUNETR
from polyfm.medseg.models.unet import UNet
from polyfm.medseg.models.unetr import UNETR

MODELS: dict[str, type[MedSegNet]] = {"unet": UNet, "basic_unet": BasicUNet, "dynunet": DynUNet, "mednext": MedNeXt, "segresnet": SegResNet, "swin_unetr": SwinUNETR, "unetr": UNETR}

__all__ = ["MODELS", "BasicUNet", "DynUNet", "MedNeXt", "MedSegNet", "SegResNet", "SwinUNETR", "UNETR", "UNet"]
