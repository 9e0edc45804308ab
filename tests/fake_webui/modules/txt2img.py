"""``modules/txt2img.py`` as far as the model goes: a generation makes sure the chosen checkpoint is
loaded (A1111's ``process_images`` calls ``reload_model_weights()``; Forge's calls
``forge_model_reload()``) and "renders" with it. ``txt2img_request`` is what the page's Generate
button runs: the function wrapped by ``wrap_gradio_gpu_call``, under the generation lock."""
from __future__ import annotations

from modules import call_queue, sd_models, shared


def txt2img(id_task, prompt):
    if shared.flavour in ("forge", "neo"):
        model, _ = sd_models.forge_model_reload()
    else:
        model = sd_models.reload_model_weights()
    if model is None or model.device == "meta":
        raise RuntimeError("no model to generate with")
    model.to("cuda")
    return [f"{prompt} by {model.sd_checkpoint_info.title}", "<p>done</p>"]


txt2img_request = call_queue.wrap_gradio_gpu_call(txt2img, extra_outputs=[None])
