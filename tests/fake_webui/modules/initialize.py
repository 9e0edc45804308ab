"""What the WebUI does at start-up that the extension depends on (``modules/initialize.py``)."""
from __future__ import annotations


def initialize() -> None:
    from modules import call_queue, sd_models, shared

    # modules/shared_init.py in the WebUI (A1111 and Forge alike; Neo and Classic have none)
    if shared.flavour in ("neo", "classic"):
        shared.interrogator = None
    else:
        from modules import interrogate

        shared.interrogator = interrogate.InterrogateModels("interrogate")
    sd_models.list_models()
    if shared.flavour not in ("forge", "neo"):
        # A1111: changing the checkpoint setting reloads the model synchronously under queue_lock,
        # so opts.set("sd_model_checkpoint", ...) from a thread holding queue_lock never returns.
        shared.opts.onchange("sd_model_checkpoint", call_queue.wrap_queued_call(lambda: sd_models.reload_model_weights()), call=False)
