"""``modules/script_callbacks.py``: registration and the functions the WebUI calls to fire them."""
from __future__ import annotations

import inspect
import os
from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])

callback_map: dict = dict(
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_tabs=[],
    callbacks_ui_train_tabs=[],
    callbacks_ui_settings=[],
    callbacks_script_unloaded=[],
    callbacks_before_ui=[],
)


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def add_callback(callbacks, fun, *, name=None, category="unknown"):
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else "unknown file"
    callbacks.append(ScriptCallback(filename, fun, name or f"{os.path.basename(filename)}/{category}"))


def _run(name, *args):
    results = []
    for c in callback_map[name]:
        results.append(c.callback(*args))  # the real one reports exceptions and goes on
    return results


def app_started_callback(demo, app):
    _run("callbacks_app_started", demo, app)


def model_loaded_callback(sd_model):
    _run("callbacks_model_loaded", sd_model)


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        res += c.callback() or []
    return res


def ui_train_tabs_callback(params):
    _run("callbacks_ui_train_tabs", params)


def ui_settings_callback():
    _run("callbacks_ui_settings")


def before_ui_callback():
    _run("callbacks_before_ui")


def script_unloaded_callback():
    _run("callbacks_script_unloaded")


def on_app_started(callback, *, name=None):
    add_callback(callback_map["callbacks_app_started"], callback, name=name, category="app_started")


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name, category="model_loaded")


def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name, category="ui_tabs")


def on_ui_train_tabs(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_train_tabs"], callback, name=name, category="ui_train_tabs")


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name, category="ui_settings")


def on_before_ui(callback, *, name=None):
    add_callback(callback_map["callbacks_before_ui"], callback, name=name, category="before_ui")


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")
