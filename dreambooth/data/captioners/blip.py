"""BLIP (Salesforce's ``blip-image-captioning-base`` / ``-large``) through transformers' own
``BlipForConditionalGeneration`` and ``BlipProcessor`` (present in transformers 4.30 and later):
one plain sentence per picture. The weights are read from ``model.safetensors`` only
(``use_safetensors=True``, nothing unpickled, no remote code), from the local folder only."""
from __future__ import annotations

import json
from pathlib import Path

from dreambooth.data.captioners.base import Captioner, CaptionerError, CaptionerUnavailable

NUM_BEAMS = 3  # as the WebUI's own BLIP: a little search gives a fuller sentence
MAX_NEW_TOKENS = 40  # BLIP's captions are a dozen words; this only stops a runaway


class BlipCaptioner(Captioner):
    """An open BLIP model and its processor, on the GPU in fp16 when there is one."""

    def __init__(self, name: str, folder: Path):
        import torch

        folder = Path(folder)
        self.name = name
        if not (folder / "model.safetensors").is_file():
            raise CaptionerUnavailable(f"the captioner {name} needs {folder / 'model.safetensors'}"
                                       ": weights are loaded from safetensors only")
        config = folder / "config.json"
        try:
            kind = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as exc:
            raise CaptionerError(f"cannot read {config}: {exc}") from exc
        if kind != "blip":
            raise CaptionerError(f"{config} is not a BLIP model (model_type {kind!r}, not 'blip')")
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = BlipProcessor.from_pretrained(str(folder), local_files_only=True)
            model = BlipForConditionalGeneration.from_pretrained(
                str(folder), use_safetensors=True, local_files_only=True, torch_dtype=self.dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CaptionerError(f"cannot load the captioner {name} from {folder}: "
                                 f"{type(exc).__name__}: {exc} (delete the folder to download it "
                                 "again)") from exc
        self.model = model.to(self.device).eval()

    def caption(self, image) -> str:
        import torch

        try:
            inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.dtype)
            with torch.inference_mode():
                out = self.model.generate(pixel_values=pixels, num_beams=NUM_BEAMS,
                                          max_new_tokens=MAX_NEW_TOKENS)
            return self.processor.decode(out[0], skip_special_tokens=True).strip()
        except (RuntimeError, ValueError) as exc:  # out of memory, a broken model
            raise CaptionerError(f"the captioner {self.name} failed: {type(exc).__name__}: "
                                 f"{exc}") from exc
