"""DreamBooth for the Stable Diffusion WebUI: the engine and the tab.

Importable without the WebUI; only :mod:`dreambooth.host` touches the WebUI's ``modules``.
"""

__version__ = "0.1.0"
