"""``modules.paths`` / ``modules.paths_internal``: where the WebUI keeps its files."""
from __future__ import annotations

import os

from modules import cmd_args

_pre = cmd_args.parse()

# The WebUI's own folder (the fake takes it from the fixture).
script_path = os.path.abspath(os.environ.get("FAKE_WEBUI_ROOT", os.getcwd()))
# --data-dir moves settings, extensions and models; --models-dir moves only the models.
data_path = os.path.abspath(_pre.data_dir) if _pre.data_dir else script_path
models_path = os.path.abspath(_pre.models_dir) if _pre.models_dir else os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
sd_default_config = os.path.join(script_path, "configs", "v1-inference.yaml")
