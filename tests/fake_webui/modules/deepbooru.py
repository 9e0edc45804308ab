"""``modules/deepbooru.py``: DeepDanbooru tags, the module-level ``model`` (A1111 1.10 / Forge 2.0).

``tag(pil_image)`` = ``start()`` (loads on first use, then onto the GPU), ``tag_multi(pil_image)``,
``stop()``. A1111's ``stop()`` moves it back to the CPU unless
``opts.interrogate_keep_models_in_memory``; Forge's ``start()`` goes through
``backend.memory_management.load_models_gpu`` and its ``stop()`` does nothing. Unlike the CLIP
interrogator, an error inside is raised. ``tag_multi`` follows ``opts.deepbooru_use_spaces``
(underscores become spaces) and joins the tags with ", ".

Fake only: tags from the picture's mean colour; ``calls`` records (what, queue_lock held).
"""
from __future__ import annotations

from modules import fake_pictures, shared

if shared.flavour in ("neo", "classic"):  # both removed the interrogators (their READMEs)
    raise ModuleNotFoundError("No module named 'modules.deepbooru'")


class DeepDanbooru:
    def __init__(self):
        self.model = None
        self.device = None  # fake only
        self.calls: list = []  # fake only

    def load(self):
        if self.model is not None:
            return
        self.model = "fake-deepdanbooru"
        self.device = "cpu"

    def start(self):
        self.load()
        if shared.flavour in ("forge", "neo"):
            from backend import memory_management

            memory_management.load_models_gpu([self.model])
        self.device = "cuda"

    def stop(self):
        if shared.flavour in ("forge", "neo"):
            return
        if not shared.opts.interrogate_keep_models_in_memory:
            self.device = "cpu"

    def tag(self, pil_image):
        self.start()
        res = self.tag_multi(pil_image)
        self.stop()
        return res

    def tag_multi(self, pil_image, force_disable_ranks=False):
        from modules import call_queue

        self.calls.append(("tag_multi", call_queue.queue_lock._lock.locked()))
        if self.device != "cuda":
            raise RuntimeError("fake: the DeepDanbooru model is not started")
        rgb = fake_pictures.mean_colour(pil_image)
        tags = [f"{fake_pictures.colour_name(rgb)}_theme", "simple_background",
                f"hex_{fake_pictures.hex_of(rgb)}"]
        if shared.opts.deepbooru_use_spaces:
            tags = [t.replace("_", " ") for t in tags]
        return ", ".join(tags)


model = DeepDanbooru()
