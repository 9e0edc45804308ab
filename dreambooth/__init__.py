"""DreamBooth for the Stable Diffusion WebUI: the engine and the tab.

Importable without the WebUI; only :mod:`dreambooth.webui` touches the WebUI's ``modules``.
"""

__version__ = "0.1.0"
