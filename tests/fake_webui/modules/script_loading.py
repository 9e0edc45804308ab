"""``modules/script_loading.py``: scripts are imported by path under their bare file name."""
from __future__ import annotations

import importlib.util
import os


def load_module(path):
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
