"""SD 2.x: one OpenCLIP ViT-H text encoder (diffusers drops its last layer on conversion, so the
penultimate layer SD2 uses is the encoder's output), 512 px, or 768 px for the v-prediction
models."""
from __future__ import annotations

from dreambooth.models.families.base import Family


class SD2(Family):
    name = "sd2"
    title = "SD 2.x"
    kinds = ("sd2", "sd2-v")

    def default_resolution(self, prediction_type: str = "epsilon") -> int:
        return 768 if prediction_type == "v_prediction" else 512
