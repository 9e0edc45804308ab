"""``modules/scripts.py``: ``basedir()`` and the loading loop for extensions' ``scripts/*.py``."""
from __future__ import annotations

import os
import sys
from collections import namedtuple

from modules import paths, script_loading

ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])

current_basedir = paths.script_path
loaded_modules: list = []  # fake only: what load_scripts imported
load_errors: list = []  # fake only: (path, exception) pairs the real one prints


def basedir():
    """The folder of the extension whose script is being imported (the WebUI root otherwise)."""
    return current_basedir


def list_scripts(scriptdirname, extension):
    scripts_list = []
    if os.path.isdir(paths.extensions_dir):
        for ext in sorted(os.listdir(paths.extensions_dir)):
            base = os.path.join(paths.extensions_dir, ext)
            folder = os.path.join(base, scriptdirname)
            if os.path.isdir(folder):
                for f in sorted(os.listdir(folder)):
                    if os.path.splitext(f)[1].lower() == extension:
                        scripts_list.append(ScriptFile(base, f, os.path.join(folder, f)))
    return scripts_list


def load_scripts():
    """As the WebUI: the extension folder is on sys.path only while its script is imported."""
    global current_basedir
    syspath = sys.path
    for scriptfile in list_scripts("scripts", ".py"):
        try:
            if scriptfile.basedir != paths.script_path:
                sys.path = [scriptfile.basedir] + sys.path
            current_basedir = scriptfile.basedir
            loaded_modules.append(script_loading.load_module(scriptfile.path))
        except Exception as e:  # the real one prints the traceback and goes on
            load_errors.append((scriptfile.path, e))
        finally:
            sys.path = syspath
            current_basedir = paths.script_path
