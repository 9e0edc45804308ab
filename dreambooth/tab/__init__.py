"""The gradio tab, one builder per sub-tab (model, concepts, parameters, run). The only package
that imports gradio, with ``app.api``'s gate for the standalone app."""
