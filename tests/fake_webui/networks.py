"""The built-in Lora extension's ``networks`` module, as far as the extension uses it.

A1111 1.10 ``extensions-builtin/Lora/networks.py`` and Forge 2.0
``extensions-builtin/sd_forge_lora/networks.py`` alike: the extension's scripts import it by
this bare name while they load (the extension folder is on ``sys.path`` only meanwhile, the
module stays in ``sys.modules``); ``list_available_networks()`` clears ``available_networks``
and ``available_network_aliases`` and walks ``cmd_opts.lora_dir`` (the extension's
``--lora-dir``, default ``models/Lora``) for ``.pt``/``.ckpt``/``.safetensors``, each listed by
its file name without extension; the module calls it once when it is imported. The Lora cards'
🔄 (``#txt2img_lora_extra_refresh_internal``) and ``POST /sdapi/v1/refresh-loras`` call it too.

Fake only: ``calls`` records each rescan (the thread it ran on and the names it found). Loading
and applying networks is not here (``lora_networks.py``).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

EXTENSIONS = (".pt", ".ckpt", ".safetensors")


class NetworkOnDisk:
    def __init__(self, name: str, filename: str) -> None:
        self.name, self.filename, self.alias = name, filename, name
        self.metadata: dict = {}


available_networks: dict[str, NetworkOnDisk] = {}
available_network_aliases: dict[str, NetworkOnDisk] = {}
forbidden_network_aliases: dict[str, int] = {}
available_network_hash_lookup: dict = {}
loaded_networks: list = []
calls: list[dict] = []


def lora_dir() -> Path:
    from modules import paths, shared

    return Path(getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"))


def list_available_networks() -> None:
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    folder = lora_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in EXTENSIONS:
            continue
        entry = NetworkOnDisk(path.stem, str(path))
        available_networks[entry.name] = entry
        available_network_aliases[entry.name] = entry
    calls.append({"thread": threading.current_thread().name, "names": list(available_networks)})


list_available_networks()
