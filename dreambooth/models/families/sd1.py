"""SD 1.x: one CLIP ViT-L text encoder, 512 px. The base interface is SD1's behaviour."""
from __future__ import annotations

from dreambooth.models.families.base import Family


class SD1(Family):
    pass
