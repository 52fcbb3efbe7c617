"""Segmentation networks: DeepLabv2 with a projection head, and the EMA teacher."""

from lpcgma.models.deeplab import DeepLabV2, PretrainedWeightsError, build_model, upsample_logits
from lpcgma.models.ema import EMATeacher

__all__ = ["DeepLabV2", "EMATeacher", "PretrainedWeightsError", "build_model", "upsample_logits"]
