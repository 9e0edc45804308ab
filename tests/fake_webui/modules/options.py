"""``modules/options.py``: OptionInfo and Options as in A1111 1.10.1 (the parts extensions use)."""
from __future__ import annotations

import json
import os


class OptionsCategory:
    def __init__(self, id, label):
        self.id, self.label = id, label


class OptionsCategories:
    """The settings page's headings (A1111 1.7+): ``register_category`` is idempotent."""

    def __init__(self):
        self.mapping = {}

    def register_category(self, category_id, label):
        if category_id not in self.mapping:
            self.mapping[category_id] = OptionsCategory(category_id, label)
        return category_id


categories = OptionsCategories()
if os.environ.get("FAKE_WEBUI_FLAVOUR", "a1111") in ("a1111", "forge"):
    # A1111's shared_options.py registers these; Neo and Classic register no "training"
    for _id, _label in (("saving", "Saving images"), ("sd", "Stable Diffusion"), ("training", "Training")):
        categories.register_category(_id, _label)


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None, comment_before="", comment_after="", infotext=None,
                 restrict_api=False, category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def link(self, label, url):
        self.comment_before += f"[<a href='{url}' target='_blank'>{label}</a>]"
        return self

    def js(self, label, js_func):
        self.comment_before += f"[<a onclick='{js_func}(); return false'>{label}</a>]"
        return self

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def html(self, html):
        self.comment_after += html
        return self

    def needs_restart(self):
        self.comment_after += " <span class='info'>(requires restart)</span>"
        return self

    def needs_reload_ui(self):
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


class OptionHTML(OptionInfo):
    def __init__(self, text):
        super().__init__(str(text).strip(), label="", component=lambda **kwargs: None)
        self.do_not_save = True


def options_section(section_identifier, options_dict):
    for v in options_dict.values():
        if len(section_identifier) == 2:
            v.section = section_identifier
        elif len(section_identifier) == 3:
            v.section = section_identifier[0:2]
            v.category_id = section_identifier[2]
    return options_dict


class Options:
    typemap = {int: float}

    def __init__(self, data_labels: dict, restricted_opts: set | None = None, freeze_settings: bool = False):
        super().__setattr__("data_labels", data_labels)
        super().__setattr__("data", {k: v.default for k, v in data_labels.items() if not v.do_not_save})
        super().__setattr__("restricted_opts", restricted_opts or set())
        super().__setattr__("freeze_settings", freeze_settings)

    def __setattr__(self, key, value):
        if key in ("data", "data_labels", "restricted_opts", "freeze_settings"):
            return super().__setattr__(key, value)
        if key in self.data or key in self.data_labels:
            if self.freeze_settings:
                raise RuntimeError("changing settings is disabled")
            info = self.data_labels.get(key)
            if info is not None and info.do_not_save:
                return
            self.data[key] = value
            return
        return super().__setattr__(key, value)

    def __getattr__(self, item):
        if item in ("data", "data_labels"):
            raise AttributeError(item)
        data = self.__dict__.get("data", {})
        labels = self.__dict__.get("data_labels", {})
        if item in data:
            return data[item]
        if item in labels:
            return labels[item].default
        raise AttributeError(f"'Options' object has no attribute '{item}'")

    def set(self, key, value, is_api=False, run_callbacks=True):
        """Sets an option and calls its onchange callback, returning True if the option changed."""
        oldval = self.data.get(key, None)
        if oldval == value:
            return False
        option = self.data_labels[key]
        if option.do_not_save:
            return False
        if is_api and option.restrict_api:
            return False
        try:
            setattr(self, key, value)
        except RuntimeError:
            return False
        if run_callbacks and option.onchange is not None:
            try:
                option.onchange()
            except Exception as e:  # the real one reports through errors.display and rolls back
                print(f"Error changing setting {key} to {value}: {e}")
                setattr(self, key, oldval)
                return False
        return True

    def get_default(self, key):
        data_label = self.data_labels.get(key)
        return None if data_label is None else data_label.default

    def save(self, filename):
        assert not self.freeze_settings, "saving settings is disabled"
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        with open(filename, "w", encoding="utf8") as file:
            json.dump(self.data, file, indent=4, ensure_ascii=False)

    def load(self, filename):
        with open(filename, "r", encoding="utf8") as file:
            self.data.update(json.load(file))

    def onchange(self, key, func, call=True):
        item = self.data_labels.get(key)
        item.onchange = func
        if call:
            func()

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def dumpjson(self):
        return json.dumps({k: self.data.get(k, v.default) for k, v in self.data_labels.items()})
