"""Registers the DreamBooth tab, settings and API routes with the WebUI.

The WebUI imports this file by path with the extension folder on sys.path only during the
import, so the package is imported here, at the top, never later from a thread.
"""
import os

import dreambooth

# Another extension could also ship a top-level "dreambooth" package; whichever loads first wins
# sys.modules. Say so plainly instead of failing later with a confusing AttributeError.
_here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_theirs = os.path.dirname(os.path.dirname(os.path.realpath(dreambooth.__file__)))
if os.path.normcase(_here) != os.path.normcase(_theirs):
    raise ImportError(f"DreamBooth: the 'dreambooth' package already loaded comes from {_theirs}, "
                      f"not from this extension ({_here}); disable the other extension.")

import dreambooth.app.api  # noqa: E402
import dreambooth.app.service  # noqa: E402
import dreambooth.tab.ui  # noqa: E402
import dreambooth.host  # noqa: E402
from modules import script_callbacks  # noqa: E402

script_callbacks.on_ui_tabs(dreambooth.tab.ui.create_tab)
script_callbacks.on_ui_settings(dreambooth.host.register_settings)
script_callbacks.on_app_started(dreambooth.app.api.on_app_started)
script_callbacks.on_app_started(dreambooth.app.service.on_app_started)
script_callbacks.on_script_unloaded(dreambooth.tab.ui.stop_timers)
