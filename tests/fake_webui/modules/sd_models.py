"""``modules/sd_models.py``: the checkpoint list, titles that change once hashed, lazy loading."""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
import time

from modules import paths, script_callbacks, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list: dict = {}
checkpoint_aliases: dict = {}
checkpoints_loaded: dict = {}

# The real WebUI keeps computed hashes in cache.json, so a title stays "name [hash]" across
# list_models(); the fake keeps them for the life of the import.
_sha256_cache: dict = {}

# fake only: seconds list_models() spends between emptying the list and refilling it (the real one
# walks the folders and reads every file's metadata there), so tests can meet that window
scan_delay = 0.0


def replace_key(d, key, new_key, value):
    keys = list(d.keys())
    d[new_key] = value
    if key not in keys:
        return d
    index = keys.index(key)
    keys[index] = new_key
    new_d = {k: d[k] for k in keys}
    d.clear()
    d.update(new_d)
    return d


def model_hash(filename):
    """The old 8-character hash of 64 KiB at offset 1 MiB."""
    try:
        with open(filename, "rb") as file:
            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"


def sha256_from_cache(filename, title):
    entry = _sha256_cache.get(title)
    if entry is None or entry[0] != os.path.getmtime(filename):
        return None
    return entry[1]


def sha256(filename, title):
    cached = sha256_from_cache(filename, title)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _sha256_cache[title] = (os.path.getmtime(filename), h.hexdigest())
    return h.hexdigest()


def read_metadata_from_safetensors(filename):
    with open(filename, mode="rb") as file:
        metadata_len = struct.unpack("<Q", file.read(8))[0]
        header = json.loads(file.read(metadata_len))
    return header.get("__metadata__", {}) or {}


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        # Neo: relative to the first of its --ckpt-dirs that holds it
        folders = [getattr(shared.cmd_opts, "ckpt_dir", None), *getattr(shared.cmd_opts, "ckpt_dirs", [])]
        abs_ckpt_dir = next((os.path.abspath(f) for f in folders
                             if f and abspath.startswith(os.path.abspath(f))), None)
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if abs_ckpt_dir and abspath.startswith(abs_ckpt_dir):
            name = abspath.replace(abs_ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)
        if name.startswith("\\") or name.startswith("/"):
            name = name[1:]

        self.metadata = {}
        if self.is_safetensors:
            try:
                self.metadata = read_metadata_from_safetensors(filename)
            except Exception as e:  # the real one reports and goes on
                print(f"Error reading metadata for {filename}: {e}")

        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.short_title = self.name_for_extra if self.shorthash is None else f"{self.name_for_extra} [{self.shorthash}]"
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f"{name} [{self.hash}]"]
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]", f"{self.name_for_extra} [{self.shorthash}]"]

    def register(self):
        checkpoints_list[self.title] = self
        for id_ in self.ids:
            checkpoint_aliases[id_] = self

    def calculate_shorthash(self):
        self.sha256 = sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return
        shorthash = self.sha256[0:10]
        if self.shorthash == self.sha256[0:10]:
            return self.shorthash
        self.shorthash = shorthash
        if self.shorthash not in self.ids:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]", f"{self.name_for_extra} [{self.shorthash}]"]
        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        replace_key(checkpoints_list, old_title, self.title, self)
        self.register()
        return self.shorthash


def _walk(folder):
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for root, _, files in os.walk(folder, followlinks=True):
        for f in files:
            low = f.lower()
            if low.endswith((".ckpt", ".safetensors")) and not low.endswith((".vae.ckpt", ".vae.safetensors")):
                found.append(os.path.join(root, f))
    return sorted(found, key=str.lower)


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    if scan_delay:
        time.sleep(scan_delay)
    model_list = _walk(model_path)
    for folder in [getattr(shared.cmd_opts, "ckpt_dir", None), *getattr(shared.cmd_opts, "ckpt_dirs", [])]:
        if folder:
            model_list += [p for p in _walk(folder) if p not in model_list]
    for filename in model_list:
        CheckpointInfo(filename).register()


def checkpoint_tiles(use_short=False):
    if shared.flavour in ("forge", "neo"):  # Forge lists names, never hashes
        return [x.short_title if use_short else x.name for x in checkpoints_list.values()]
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    checkpoint_info = checkpoint_aliases.get(search_string, None)
    if checkpoint_info is not None:
        return checkpoint_info
    found = sorted([info for info in checkpoints_list.values() if search_string in info.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    search_string_without_checksum = re.sub(re_strip_checksum, "", search_string)
    found = sorted([info for info in checkpoints_list.values() if search_string_without_checksum in info.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    return None


def select_checkpoint():
    checkpoint_info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint, None)
    if checkpoint_info is not None:
        return checkpoint_info
    if not checkpoints_list:
        if shared.flavour in ("forge", "neo"):  # Forge prints and returns None
            print("You do not have any model!")
            return None
        raise FileNotFoundError("No checkpoints found. When searching for checkpoints, looked at:\n"
                                f" - file {os.path.abspath(getattr(shared.cmd_opts, 'ckpt_dir', None) or model_path)}")
    return next(iter(checkpoints_list.values()))


class FakeSDModel:
    """Stands in for a loaded LatentDiffusion: knows its checkpoint, its device, and what kind of
    model the WebUI took the file for (from its keys; see ``sd_models_config``):

    - ``is_sd1`` / ``is_sd2`` / ``is_sdxl``: A1111 1.10.1 sets them in ``load_model_weights``
      from the instantiated config (SDXL's has a ``conditioner``); Forge's engines
      (``StableDiffusionXL`` ...) set them for "WebUI Legacy", its loader telling the family from
      the state dict's keys alone (no ``.yaml`` beside the file);
    - ``used_config``: A1111's ``sd_model.used_config``, the config file it chose (None on Forge);
    - ``parameterization``: ``"v"`` or ``"eps"`` (A1111: the config's, ``extend_sdxl`` for SDXL;
      Forge: the ``v_pred`` key);
    - ``ztsnr`` (fake only): the file's ``ztsnr`` marker key, which Forge/reForge read to use a
      zero-terminal-SNR schedule.
    """

    def __init__(self, checkpoint_info):
        from modules import sd_models_config as config

        self.sd_checkpoint_info = checkpoint_info
        self.sd_model_checkpoint = checkpoint_info.filename
        self.device = "cuda"
        state_dict = config.read_state_dict_shapes(checkpoint_info.filename)
        if shared.flavour in ("forge", "neo"):
            self.used_config = None
            family = config.model_family(config.guess_model_config_from_state_dict(state_dict, ""))
            self.parameterization = "v" if "v_pred" in state_dict else "eps"
        else:
            self.used_config = config.find_checkpoint_config(state_dict, checkpoint_info)
            family = config.model_family(self.used_config)
            self.parameterization = config.parameterization(self.used_config)
        self.is_sdxl = family == "sdxl"
        self.is_sd2 = family == "sd2"
        self.is_sd1 = family == "sd1"
        self.ztsnr = "ztsnr" in state_dict

    def to(self, device):
        self.device = device
        return self


class FakeInitialModel:
    """Forge: what ``model_data.sd_model`` holds while no model is loaded."""

    sd_checkpoint_info = None

    def get_prompt_lengths_on_ui(self, prompt):
        return 0, 75


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()
        self.loads = []  # fake only: titles loaded, in order
        if shared.flavour in ("forge", "neo"):  # what Forge's lazy loading compares
            self.forge_loading_parameters = {}
            self.forge_hash = ""

    def get_sd_model(self):
        if self.was_loaded_at_least_once:
            return self.sd_model
        if self.sd_model is None:
            with self.lock:
                if self.sd_model is not None or self.was_loaded_at_least_once:
                    return self.sd_model
                load_model()
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v
        if v in self.loaded_sd_models:
            self.loaded_sd_models.remove(v)
        if v is not None:
            self.loaded_sd_models.insert(0, v)
            self.was_loaded_at_least_once = True


model_data = SdModelData()


def load_model(checkpoint_info=None):
    checkpoint_info = checkpoint_info or select_checkpoint()
    if checkpoint_info is None:
        return None
    old = model_data.sd_model
    if getattr(old, "sd_checkpoint_info", None) is not None:  # A1111: the old one to the trash
        send_model_to_trash(old)
        if old in model_data.loaded_sd_models:
            model_data.loaded_sd_models.remove(old)
    if shared.flavour not in ("forge", "neo"):
        checkpoint_info.calculate_shorthash()  # A1111 hashes the file when it loads it
    model = FakeSDModel(checkpoint_info)
    if shared.flavour == "classic":
        from ldm_patched.modules import model_management

        model_management.load_models_gpu([model])
    model_data.loads.append(checkpoint_info.title)
    model_data.set_sd_model(model)
    script_callbacks.model_loaded_callback(model)
    return model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    checkpoint_info = info or select_checkpoint()
    current = sd_model or model_data.sd_model  # None after a failed (or freed) load: load anew
    if current is not None and not forced_reload and current.sd_checkpoint_info.filename == checkpoint_info.filename:
        current.to("cuda")
        return current
    return load_model(checkpoint_info)


def send_model_to_cpu(m):
    if m is not None and hasattr(m, "to"):
        m.to("cpu")


def send_model_to_trash(m):
    """A1111: ``m.to(device="meta")`` - the weights' memory is freed. Forge Classic: a no-op
    (its ldm_patched model_management holds the weights until ``unload_all_models()``)."""
    if shared.flavour == "classic":
        return
    m.to("meta")


def forge_model_reload():
    """Forge: (re)load the chosen checkpoint at a generation when the plan changed."""
    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash and getattr(model_data.sd_model, "sd_checkpoint_info", None):
        return model_data.sd_model, False
    info = model_data.forge_loading_parameters.get("checkpoint_info") or select_checkpoint()
    if info is None:
        raise ValueError("You do not have any model! Please download at least one model in [models/Stable-diffusion].")
    model = load_model(info)
    model_data.forge_hash = current_hash
    return model, True


def unload_model_weights(sd_model=None, info=None):
    if shared.flavour in ("forge", "neo"):  # Forge: memory_management.unload_all_models(), no lazy load
        send_model_to_cpu(model_data.sd_model)
        return sd_model
    # A1111 1.10.1 reads shared.sd_model here: with no model ever loaded, this loads one first.
    send_model_to_cpu(sd_model or shared.sd_model)
    return sd_model


if shared.flavour == "neo":  # Neo removed these (it loads lazily through main_entry only)
    del reload_model_weights, send_model_to_trash
