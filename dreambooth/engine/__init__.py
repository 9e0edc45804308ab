"""The training engine: the loop (``trainer``) and its phases, resume points, run outputs,
samples and class pictures, optimizers and the fused pass, the training log. No gradio, no
WebUI; imports ``models``, ``data`` and ``common``."""
