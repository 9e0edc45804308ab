"""``modules/interrogate.py``: the "Interrogate CLIP" models, the WebUI's ``shared.interrogator``
(made by ``initialize()``). Same names and behaviour as A1111 1.10 / Forge 2.0:

- ``interrogate(pil_image)``: ``shared.state.begin(job="interrogate")``, ``load()``, the BLIP
  caption, ``send_blip_to_ram()``, then ", "-joined CLIP "flavours"; ``unload()`` and
  ``state.end()``. A failure inside (a model that cannot be downloaded...) is NOT raised: it is
  printed and the text gets ``"<error>"`` appended, exactly as the real one does.
- ``generate_caption(pil_image)``: the BLIP sentence alone; needs ``load()`` first.
- A1111: ``load()`` puts both models on the interrogate device, ``send_*_to_ram()`` / ``unload()``
  move them back to the CPU unless ``opts.interrogate_keep_models_in_memory``. Forge: ``load()``
  hands them to ``backend.memory_management.load_models_gpu``; ``send_*_to_ram`` and ``unload``
  do nothing (Forge's memory manager moves models out when it needs the room).

Fake only: captions come from the picture's mean colour (``modules.fake_pictures``); ``calls``
records (what, whether queue_lock was held); ``fail`` makes the next calls fail inside;
``offline`` makes ``load()`` fail as A1111's does offline: ``modelloader.load_models`` returns no
file when the download fails, and ``blip_decoder(pretrained=files[0])`` raises IndexError.
"""
from __future__ import annotations

from modules import fake_pictures, shared

if shared.flavour in ("neo", "classic"):  # both removed the interrogators (their READMEs)
    raise ModuleNotFoundError("No module named 'modules.interrogate'")


def _lock_held() -> bool:
    from modules import call_queue

    return call_queue.queue_lock._lock.locked()


class InterrogateModels:
    blip_model = None
    clip_model = None
    clip_preprocess = None
    dtype = None

    def __init__(self, content_dir):
        self.content_dir = content_dir
        self.loaded_categories = None
        self.device = {"blip": None, "clip": None}  # fake only: "cuda" / "cpu"
        self.calls: list = []  # fake only
        self.fail = False  # fake only
        self.offline = False  # fake only

    def load(self):
        if self.offline:
            files: list = []  # modelloader.load_models(...) after a failed download
            return files[0]
        if self.fail:
            raise RuntimeError("fake: cannot download model_base_caption_capfilt_large.pth")
        if self.blip_model is None:
            self.blip_model = "fake-blip"
        if self.clip_model is None:
            self.clip_model, self.clip_preprocess = "fake-clip", "fake-preprocess"
        self.dtype = "float16"
        if shared.flavour in ("forge", "neo"):
            from backend import memory_management

            memory_management.load_models_gpu([self.blip_model, self.clip_model])
        self.device = {"blip": "cuda", "clip": "cuda"}

    def send_clip_to_ram(self):
        if shared.flavour in ("forge", "neo"):
            return
        if not shared.opts.interrogate_keep_models_in_memory and self.clip_model is not None:
            self.device["clip"] = "cpu"

    def send_blip_to_ram(self):
        if shared.flavour in ("forge", "neo"):
            return
        if not shared.opts.interrogate_keep_models_in_memory and self.blip_model is not None:
            self.device["blip"] = "cpu"

    def unload(self):
        self.send_clip_to_ram()
        self.send_blip_to_ram()

    def generate_caption(self, pil_image):
        self.calls.append(("generate_caption", _lock_held()))
        if self.blip_model is None or self.device["blip"] != "cuda":
            raise RuntimeError("fake: BLIP is not loaded (call load() first)")
        return f"a picture of {fake_pictures.colour_name(fake_pictures.mean_colour(pil_image))}"

    def interrogate(self, pil_image):
        self.calls.append(("interrogate", _lock_held()))
        res = ""
        shared.state.begin(job="interrogate")
        try:
            self.load()
            caption = self.generate_caption(pil_image)
            self.send_blip_to_ram()
            res = caption
            rgb = fake_pictures.mean_colour(pil_image)
            flavours = ["flat colour", "bright" if sum(rgb) > 382 else "dark", f"hex {fake_pictures.hex_of(rgb)}"]
            for flavour in flavours:
                res += f", {flavour}"
        except Exception as exc:  # errors.report(...) in the real one: printed, not raised
            print(f"Error interrogating: {exc}")
            res += "<error>"
        self.unload()
        shared.state.end()
        return res
