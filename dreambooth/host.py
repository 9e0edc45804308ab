"""The host adapter: the ONLY module of the extension that imports the WebUI's ``modules.*``.

Two implementations of one interface:

- :class:`WebUIHost` inside AUTOMATIC1111 / Forge / reForge (checkpoint list, folders, settings,
  progress bar and the generation lock come from the WebUI);
- :class:`StandaloneHost` without a WebUI (``python -m dreambooth ...``): a models folder laid out
  like the WebUI's.

:func:`get_host` picks one. ``modules.*`` is imported lazily, inside the methods, so this module
imports anywhere, and nothing is read from the WebUI before it has initialised.

What happens to generation while training runs (the decision, also in the README)
-------------------------------------------------------------------------------
With the setting "Hold generation during training" on (the default), the training job holds the
WebUI's ``call_queue.queue_lock`` from just before it frees the GPU until training ends, exactly
as the WebUI's own Train tab does: a txt2img/img2img request made meanwhile waits in the WebUI's
queue (its progress bar shows the training's progress text) and runs when training finishes or is
cancelled. It never deadlocks: the lock is taken only by the job's own thread, never by a thread
that may already hold it, and switching checkpoints runs in a fresh thread
(:meth:`WebUIHost.load_checkpoint`). It never crashes training with out-of-memory, because no
generation can start while training holds the GPU.

With the setting off, generation runs alongside training: the WebUI reloads its model onto the GPU
at the next generation and the two share GPU memory, so either may fail with out-of-memory; the
WebUI's progress bar is then left to the generation (the job's progress shows only in our tab).
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from dreambooth.common.host_types import (ALL_FAMILIES, FAMILIES_BY_WEBUI, HOLD_GENERATION_KEY,
                                          OUTPUT_SUBDIR_KEY, SETTINGS, SETTINGS_CATEGORY,
                                          SETTINGS_SECTION, UNLOAD_MODEL_KEY, WORK_DIR_KEY,
                                          CheckpointEntry, Host, InterrogatorError)
from dreambooth.common.interrogators import interrogator_download_hint, interrogator_failure
from dreambooth.common.names import sanitize_model_name, sanitize_subfolder

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
VAE_EXTENSIONS = (".safetensors", ".ckpt", ".pt")

# Which threads hold queue_lock through hold_generation(). The WebUI's FIFOLock records no owner,
# and taking it twice on one thread hangs forever; this per-thread mark (not shared data) is how
# unload_webui_model() knows not to take it again, whichever host object it is called on.
_holding = threading.local()

def without_hash(title: str) -> str:
    """A checkpoint title without the " [hash]" the WebUI appends once it hashed the file."""
    return re.sub(r"\s*\[[^]]+]\s*$", "", title.strip())


def _inside(root: Path, child: Path) -> Path:
    """``child`` resolved, after checking that it lies under ``root`` (symlinks included)."""
    resolved = child.resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise ValueError(f"{child} is outside {root}")
    return child


class _FolderLayout:
    """Folder rules shared by both hosts (subclasses give models_dir, checkpoints_dir, setting)."""

    def models_dir(self) -> Path:  # pragma: no cover - overridden
        raise NotImplementedError

    def checkpoints_dir(self) -> Path:  # pragma: no cover - overridden
        raise NotImplementedError

    def setting(self, key: str, default: Any = None) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def vae_dir(self) -> Path:
        return self.models_dir() / "VAE"

    def lora_dir(self) -> Path:
        """Where LoRA files go: the folder the WebUI's built-in Lora extension lists."""
        return self.models_dir() / "Lora"

    def text_encoder_dir(self) -> Path:
        """Where Forge keeps separate text encoders (Flux's clip_l, t5xxl): models/text_encoder."""
        return self.models_dir() / "text_encoder"

    def list_text_encoders(self) -> list[Path]:
        folder = self.text_encoder_dir()
        if not folder.is_dir():
            return []
        return sorted((p for p in folder.rglob("*.safetensors") if p.is_file()),
                      key=lambda p: str(p).lower())

    def list_vaes(self) -> list[Path]:
        folder = self.vae_dir()
        if not folder.is_dir():
            return []
        return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VAE_EXTENSIONS),
                      key=lambda p: str(p).lower())

    def work_root(self) -> Path:
        """The setting's folder (relative paths are under the models folder), else models/dreambooth."""
        configured = str(self.setting(WORK_DIR_KEY, "") or "").strip()
        if not configured:
            return self.models_dir() / "dreambooth"
        path = Path(os.path.expanduser(configured))
        return path if path.is_absolute() else self.models_dir() / path

    def work_dir(self, name: str) -> Path:
        """``<work root>/<sanitised name>``; ValueError for a name that would leave the folder."""
        root = self.work_root()
        return _inside(root, root / sanitize_model_name(name))

    def output_dir(self) -> Path:
        """Where exported checkpoints go: the checkpoints folder, or the configured subfolder of it."""
        root = self.checkpoints_dir()
        sub = sanitize_subfolder(str(self.setting(OUTPUT_SUBDIR_KEY, "") or ""))
        return _inside(root, root / sub) if sub else root


def _m(name: str):
    """``modules.<name>`` from the WebUI, imported when first needed."""
    return importlib.import_module(f"modules.{name}")


def _optional_module(name: str) -> Any:
    """A module that only some WebUIs have (None elsewhere)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class WebUIHost(_FolderLayout):
    """Inside the WebUI (A1111 1.10, Forge 2.0, reForge)."""

    is_webui = True

    # --- which WebUI -------------------------------------------------------------------------
    def webui_name(self) -> str:
        """Forge Neo (the only one with ``--ckpt-dirs``), Forge (lazy loading), Forge Classic
        (ComfyUI's memory manager, no interrogators), reForge (the same, with them) or A1111."""
        if hasattr(_m("shared").cmd_opts, "ckpt_dirs"):
            return "Forge Neo"
        if self.loads_lazily():
            return "Forge"
        if _optional_module("ldm_patched.modules.model_management") is not None:
            return "reForge" if _optional_module("modules.interrogate") is not None else "Forge Classic"
        return "AUTOMATIC1111"

    def families(self) -> frozenset[str]:
        return FAMILIES_BY_WEBUI.get(self.webui_name(), ALL_FAMILIES)

    # --- checkpoints -------------------------------------------------------------------------
    @staticmethod
    def _entry(info: Any, forge: bool) -> CheckpointEntry:
        # Forge's selector lists plain names (its checkpoint_tiles), A1111's the titles, which
        # gain " [hash]" once a file is hashed: the tab shows what the WebUI's own selector shows.
        return CheckpointEntry(title=info.title, filename=info.filename, name=info.name,
                               hash=getattr(info, "shorthash", None),
                               label=info.name if forge else info.title)

    def list_checkpoints(self) -> list[CheckpointEntry]:
        forge = self.loads_lazily()
        return [self._entry(info, forge)
                for info in list(_m("sd_models").checkpoints_list.values())]

    def resolve_checkpoint(self, title_or_name: str) -> CheckpointEntry | None:
        """By title, old title, name or hash: titles change once the WebUI hashes a file."""
        info = _m("sd_models").get_closet_checkpoint_match(title_or_name or "")
        return None if info is None else self._entry(info, self.loads_lazily())

    def refresh_checkpoints(self) -> None:
        """Rescan the checkpoint folders (the 🔄 buttons). The WebUI's list_models() empties the
        list before it rescans: a generation starting meanwhile fails with "No checkpoints found",
        so the job itself uses :meth:`add_checkpoints` while it still holds the lock."""
        _m("sd_models").list_models()

    def add_checkpoints(self, paths: list[Path]) -> None:
        """Put newly written checkpoints into the WebUI's list without emptying it (registered
        the way list_models() registers each file); a full rescan only if that fails."""
        sd_models = _m("sd_models")
        known = {os.path.abspath(info.filename) for info in list(sd_models.checkpoints_list.values())}
        for path in paths:
            if os.path.abspath(path) in known or not Path(path).is_file():
                continue
            try:
                sd_models.CheckpointInfo(str(path)).register()
            except Exception:  # a fork with another CheckpointInfo: the WebUI's own rescan
                sd_models.list_models()
                return

    # --- LoRA files --------------------------------------------------------------------------
    def refresh_loras(self) -> bool:
        """Rescan the Lora folder into the built-in Lora extension's list (what its 🔄 on the
        Lora cards does server-side), so a new file's ``<lora:name:1>`` and its card are known.
        The extension (A1111 ``extensions-builtin/Lora``, Forge ``sd_forge_lora``) imports its
        ``networks`` module by that bare name while it loads; with the extension disabled there
        is none, and nothing happens. True when the list was rescanned; never raises (a
        generation that meets a name it does not know rescans by itself anyway)."""
        networks = sys.modules.get("networks")
        rescan = getattr(networks, "list_available_networks", None)
        if not callable(rescan) or not hasattr(networks, "available_networks"):
            return False
        try:
            rescan()
        except Exception as exc:  # the Lora extension's own trouble: reported, not raised
            print(f"DreamBooth: the Lora list could not be refreshed ({type(exc).__name__}: {exc})")
            return False
        return True

    # --- folders -----------------------------------------------------------------------------
    def models_dir(self) -> Path:
        return Path(_m("paths").models_path)  # already follows --data-dir and --models-dir

    def checkpoints_dir(self) -> Path:
        """``--ckpt-dir`` when given (the user keeps checkpoints there), else models/Stable-diffusion."""
        ckpt_dir = getattr(_m("shared").cmd_opts, "ckpt_dir", None)
        return Path(ckpt_dir) if ckpt_dir else Path(_m("sd_models").model_path)

    def vae_dir(self) -> Path:
        vae_dir = getattr(_m("shared").cmd_opts, "vae_dir", None)
        return Path(vae_dir) if vae_dir else self.models_dir() / "VAE"

    def text_encoder_dir(self) -> Path:
        """``--text-encoder-dir`` where the WebUI has it (Forge), else models/text_encoder."""
        folder = getattr(_m("shared").cmd_opts, "text_encoder_dir", None)
        return Path(folder) if folder else self.models_dir() / "text_encoder"

    def lora_dir(self) -> Path:
        """``--lora-dir`` (the built-in Lora extension's option, A1111 and Forge) when given."""
        lora_dir = getattr(_m("shared").cmd_opts, "lora_dir", None)
        return Path(lora_dir) if lora_dir else self.models_dir() / "Lora"

    # --- settings ----------------------------------------------------------------------------
    def register_settings(self) -> None:
        shared = _m("shared")
        try:  # A1111 registers the "Training" heading itself; Forge Neo and Classic do not
            _m("options").categories.register_category(SETTINGS_CATEGORY, "Training")
        except Exception:  # WebUIs before 1.7 have no categories (register_category is idempotent)
            pass
        for key, (default, label, info) in SETTINGS.items():
            try:
                option = shared.OptionInfo(default, label, section=SETTINGS_SECTION, category_id=SETTINGS_CATEGORY)
            except TypeError:  # WebUIs before 1.7 have no settings categories
                option = shared.OptionInfo(default, label, section=SETTINGS_SECTION)
            if hasattr(option, "info"):
                option = option.info(info)
            shared.opts.add_option(key, option)

    def setting(self, key: str, default: Any = None) -> Any:
        opts = _m("shared").opts
        if key in getattr(opts, "data", {}):
            return opts.data[key]
        return SETTINGS[key][0] if default is None and key in SETTINGS else default

    # --- GPU, model switching ----------------------------------------------------------------
    def _loaded_model(self) -> Any:
        """The WebUI's loaded model, or None — without ``shared.sd_model``, which LOADS a model
        when none was ever loaded (A1111's ``unload_model_weights()`` without argument reads it)."""
        model = getattr(getattr(_m("sd_models"), "model_data", None), "sd_model", None)
        if model is None or getattr(model, "sd_checkpoint_info", None) is None:
            return None  # nothing loaded (Forge keeps a FakeInitialModel placeholder)
        return model

    def _under_lock(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` holding queue_lock (already held inside :meth:`hold_generation`), so a
        running generation is never pulled from under its feet."""
        if getattr(_holding, "held", False):
            return action()
        with _m("call_queue").queue_lock:
            return action()

    def unload_webui_model(self) -> Any:
        """Unload the WebUI's model for real — GPU memory and RAM — when the setting says so;
        returns what :meth:`restore_webui_model` needs to bring it back (None: nothing unloaded).

        A1111 has no function that frees a model's RAM (``unload_model_weights`` only moves it to
        the CPU): its own ``send_model_to_trash`` moves the weights to the meta device, and every
        reference the WebUI keeps (the active model, the loaded-models list, the state-dict
        cache) is dropped. Forge: ``unload_all_models`` and forgetting the loaded model's hash,
        so its next generation loads the checkpoint again (as it does after a switch)."""
        if not self.setting(UNLOAD_MODEL_KEY, True):
            return None
        sd_models = _m("sd_models")
        model = self._loaded_model()
        if model is None:
            return None
        info = model.sd_checkpoint_info
        data = sd_models.model_data

        def unload() -> None:
            if hasattr(data, "forge_hash"):  # Forge
                memory = importlib.import_module("backend.memory_management")
                # Forge's own placeholder for "no model" (its UI asks it for prompt lengths)
                placeholder = getattr(sd_models, "FakeInitialModel", None)
                data.sd_model = placeholder() if placeholder is not None else None
                memory.unload_all_models()
                memory.soft_empty_cache()
                data.forge_hash = ""
            else:
                for loaded in list(getattr(data, "loaded_sd_models", [])) or [model]:
                    sd_models.send_model_to_trash(loaded)
                data.sd_model = None
                if hasattr(data, "loaded_sd_models"):
                    data.loaded_sd_models.clear()
                getattr(sd_models, "checkpoints_loaded", {}).clear()
                # Forge Classic: send_model_to_trash does nothing, and its ComfyUI-style memory
                # manager keeps the weights until asked to let them go
                classic = _optional_module("ldm_patched.modules.model_management")
                if classic is not None:
                    classic.unload_all_models()
                    classic.soft_empty_cache()

        self._under_lock(unload)
        from dreambooth.common.memory import give_memory_back

        give_memory_back()
        return info

    def restore_webui_model(self, unloaded: Any) -> str | None:
        """Load again what :meth:`unload_webui_model` unloaded (A1111 loads now, inside the
        job's hold so that a waiting generation finds it; Forge loads at its next generation).
        Returns a message for the log, or None when nothing was unloaded."""
        if unloaded is None:
            return None
        sd_models = _m("sd_models")
        if hasattr(sd_models.model_data, "forge_hash"):
            return f"the WebUI loads {unloaded.title} again at its next generation"

        def load() -> None:
            sd_models.reload_model_weights(info=unloaded)

        try:
            self._under_lock(load)
        except Exception as exc:  # reported; the WebUI loads it again at the next generation
            return f"could not load {unloaded.title} again ({exc}); the WebUI loads it at its next generation"
        return f"loaded the WebUI's model {unloaded.title} again"

    def _forge_checkpoint_change(self) -> Callable[..., Any] | None:
        try:
            return importlib.import_module("modules_forge.main_entry").checkpoint_change
        except Exception:
            return None

    def loads_lazily(self) -> bool:
        """Forge records a checkpoint switch and loads the model at the next generation."""
        return self._forge_checkpoint_change() is not None

    def generation_busy(self) -> bool:
        """Whether something (a generation, a training job) holds the WebUI's lock right now."""
        lock = _m("call_queue").queue_lock
        if getattr(_holding, "held", False):
            return True
        if lock.acquire(blocking=False):
            lock.release()
            return False
        return True

    def load_checkpoint(self, title: str, wait_s: float = 30.0,
                        on_done: Callable[[BaseException | None], None] | None = None) -> bool:
        """Makes ``title`` the WebUI's active checkpoint. True when done before returning;
        ``on_done(error or None)`` is called by the switch's thread when it has finished, in
        either case (the tab's message follows it).

        A1111 loads synchronously under ``queue_lock`` inside ``opts.set``, so calling it from a
        thread that holds the lock (a wrapped Gradio handler, a training job) would hang forever.
        The switch therefore runs in a fresh thread, which holds nothing; the caller waits for it
        at most ``wait_s`` seconds. False means it is still waiting for the lock (a generation or
        training is running) and will finish by itself when the lock is free. Forge only records
        the choice (``checkpoint_change``) and loads at the next generation. Raises ValueError
        for an unknown checkpoint and re-raises an error the switch itself hit.
        """
        sd_models = _m("sd_models")
        info = sd_models.get_closet_checkpoint_match(title or "")
        if info is None:
            raise ValueError(f"checkpoint not found: {title!r}")
        forge_change = self._forge_checkpoint_change()
        errors: list[BaseException] = []
        waiting = threading.Event()  # set while the caller still waits for the outcome
        waiting.set()

        def switch() -> None:
            try:
                shared = _m("shared")
                if forge_change is not None:
                    # Forge's list shows names, not titles. Later Forge forks add a preset argument.
                    params = inspect.signature(forge_change).parameters
                    if "preset" in params:
                        forge_change(info.name, preset=getattr(shared.opts, "forge_preset", None))
                    else:
                        forge_change(info.name)
                else:
                    shared.opts.set("sd_model_checkpoint", info.title)
                    shared.opts.save(shared.config_filename)
                # A1111's opts.set reports a failed load only by rolling the setting back.
                active = sd_models.get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint") or "")
                if active is None or active.filename != info.filename:
                    raise RuntimeError(f"the WebUI did not switch to {info.title} (see its console)")
            except BaseException as e:  # handed to the caller if it still waits, else printed
                errors.append(e)
                if not waiting.is_set():
                    print(f"DreamBooth: switching the WebUI to {info.title} failed: {e}")
            if on_done is not None:
                on_done(errors[0] if errors else None)

        worker = threading.Thread(target=switch, name="dreambooth-load-checkpoint", daemon=True)
        worker.start()
        worker.join(wait_s)
        waiting.clear()
        if worker.is_alive():
            return False
        if errors:
            raise errors[0]
        return True

    # --- progress and the generation lock ----------------------------------------------------
    def set_webui_progress(self, job: str, step: int, total: int, text: str = "") -> None:
        """Shows training progress in the WebUI's own progress bar, only while generation is held
        (otherwise the bar belongs to a generation running alongside)."""
        if not getattr(_holding, "held", False):
            return
        state = _m("shared").state
        state.job = job
        state.job_count = max(int(total), 0)
        state.job_no = max(min(int(step), int(total)), 0)
        state.sampling_step, state.sampling_steps = 0, 0
        state.textinfo = text

    def show_webui_preview(self, image: Any) -> None:
        if getattr(_holding, "held", False):
            _m("shared").state.assign_current_image(image)

    @contextmanager
    def hold_generation(self, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
        """Holds ``queue_lock`` for the block when the setting says so; yields whether it does.

        Enter it on the training job's own thread (never from a Gradio handler, which may hold
        the lock already). If a generation is running, ``on_wait()`` is called first (to show
        "waiting for the WebUI") and the block starts when that generation ends, in queue order.
        """
        if not self.setting(HOLD_GENERATION_KEY, True) or getattr(_holding, "held", False):
            yield bool(getattr(_holding, "held", False))
            return
        lock = _m("call_queue").queue_lock
        if not lock.acquire(blocking=False):
            if on_wait is not None:
                on_wait()
            lock.acquire()
        state = _m("shared").state
        _holding.held = True
        try:
            state.begin(job="DreamBooth training")
            yield True
        finally:
            _holding.held = False
            try:
                state.end()
            finally:
                lock.release()


    # --- interrogators (captions for the user's pictures) -----------------------------------
    def interrogators(self) -> list[str]:
        """What this WebUI can caption with. A1111 1.10 and Forge 2.0 both make
        ``shared.interrogator`` at start-up (modules/shared_init.py) and have
        ``modules.deepbooru.model``; a fork without one simply lists fewer."""
        kinds = []
        if getattr(_m("shared"), "interrogator", None) is not None:
            kinds += ["clip", "blip"]
        try:
            if getattr(_m("deepbooru"), "model", None) is not None:
                kinds.append("deepbooru")
        except Exception:  # a fork without DeepBooru, or one whose import fails
            pass
        return kinds

    def interrogate(self, kind: str, image: Any) -> str:
        """The WebUI's caption for ``image`` (an RGB PIL image), under ``queue_lock`` for this one
        picture only, as the WebUI's own /sdapi/v1/interrogate does: a generation waiting
        meanwhile runs between two pictures, never alongside one (both need the GPU).

        Each call loads and puts away the models the WebUI's own way (A1111 moves them back to
        the CPU unless "Keep models in VRAM"; Forge's memory manager decides)."""
        if kind not in self.interrogators():
            raise InterrogatorError(f"this WebUI has no {kind!r} interrogator "
                                    f"(it has: {', '.join(self.interrogators()) or 'none'})")

        def run() -> str:
            if kind == "deepbooru":
                return _m("deepbooru").model.tag(image)
            interrogator = _m("shared").interrogator
            if kind == "clip":
                return interrogator.interrogate(image)
            interrogator.load()  # "blip": the sentence alone (the WebUI's Caption postprocessing)
            try:
                return interrogator.generate_caption(image)
            finally:
                interrogator.unload()

        try:
            text = self._under_lock(run)
        except Exception as exc:
            raise InterrogatorError(interrogator_failure(kind, exc, self.models_dir())) from exc
        # interrogate() does not raise: it prints the traceback and appends "<error>"
        if text is None or "<error>" in str(text):
            raise InterrogatorError(f"the WebUI's {kind} interrogator failed (its console shows "
                                    "why; a model it could not download, often): "
                                    + interrogator_download_hint(kind, self.models_dir()))
        return str(text)


class StandaloneHost(_FolderLayout):
    """No WebUI: a models folder laid out like the WebUI's (``Stable-diffusion/``, ``VAE/``)."""

    is_webui = False

    def __init__(self, models_dir: str | os.PathLike, settings: Mapping[str, Any] | None = None,
                 checkpoints_dir: str | os.PathLike | None = None) -> None:
        self._models = Path(models_dir)
        self._checkpoints = Path(checkpoints_dir) if checkpoints_dir else self._models / "Stable-diffusion"
        self._settings = dict(settings or {})

    def models_dir(self) -> Path:
        return self._models

    def checkpoints_dir(self) -> Path:
        return self._checkpoints

    def list_checkpoints(self) -> list[CheckpointEntry]:
        """Every .safetensors/.ckpt under the checkpoints folder; titles are the relative names."""
        root = self._checkpoints
        if not root.is_dir():
            return []
        found = []
        for path in root.rglob("*"):
            low = path.name.lower()
            if path.is_file() and low.endswith(CHECKPOINT_EXTENSIONS) and not low.endswith((".vae.safetensors", ".vae.ckpt")):
                name = path.relative_to(root).as_posix()
                found.append(CheckpointEntry(title=name, filename=str(path.resolve()), name=name, hash=None))
        return sorted(found, key=lambda e: e.name.lower())

    def resolve_checkpoint(self, title_or_name: str) -> CheckpointEntry | None:
        """Like the WebUI's lookup: exact name or stem, then the shortest title containing it
        (a trailing ``[hash]`` from a WebUI title is ignored)."""
        if not title_or_name:
            return None
        text = without_hash(title_or_name)
        entries = self.list_checkpoints()
        for e in entries:
            if text in (e.title, e.name, Path(e.name).stem, e.filename):
                return e
        matches = sorted((e for e in entries if text in e.title), key=lambda e: len(e.title))
        return matches[0] if matches else None

    def refresh_checkpoints(self) -> None:
        return None  # listed fresh on every call

    def add_checkpoints(self, paths: list[Path]) -> None:
        return None

    def refresh_loras(self) -> bool:
        return False  # no WebUI, no Lora list

    def unload_webui_model(self) -> Any:
        return None

    def restore_webui_model(self, unloaded: Any) -> str | None:
        return None

    def load_checkpoint(self, title: str, wait_s: float = 30.0,
                        on_done: Callable[[BaseException | None], None] | None = None) -> bool:
        """There is no txt2img to load into without the WebUI."""
        return False

    def loads_lazily(self) -> bool:
        return False

    def generation_busy(self) -> bool:
        return False

    def register_settings(self) -> None:
        return None

    def setting(self, key: str, default: Any = None) -> Any:
        if key in self._settings:
            return self._settings[key]
        return SETTINGS[key][0] if default is None and key in SETTINGS else default

    def set_webui_progress(self, job: str, step: int, total: int, text: str = "") -> None:
        return None

    def show_webui_preview(self, image: Any) -> None:
        return None

    @contextmanager
    def hold_generation(self, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
        yield False

    def interrogators(self) -> list[str]:
        return []  # the interrogators are the WebUI's: none without it

    def webui_name(self) -> str:
        return "standalone"

    def families(self) -> frozenset[str]:
        return ALL_FAMILIES

    def interrogate(self, kind: str, image: Any) -> str:
        raise InterrogatorError("captioning uses the WebUI's interrogators; there is no WebUI here")


def webui_available() -> bool:
    """True inside a WebUI whose ``modules.shared`` is importable and initialised."""
    try:
        shared = importlib.import_module("modules.shared")
        importlib.import_module("modules.sd_models")
    except Exception:
        return False
    return getattr(shared, "opts", None) is not None and getattr(shared, "cmd_opts", None) is not None


def get_host(models_dir: str | os.PathLike | None = None) -> Host:
    """The WebUI's host when running inside it, else a standalone one on ``models_dir``
    (default ``$DREAMBOOTH_MODELS_DIR`` or ``./models``)."""
    if webui_available():
        return WebUIHost()
    return StandaloneHost(models_dir or os.environ.get("DREAMBOOTH_MODELS_DIR") or "models")


def register_settings() -> None:
    """``on_ui_settings`` callback: the DreamBooth section of the WebUI's settings page."""
    WebUIHost().register_settings()


def tool_button_class() -> Any | None:
    """The WebUI's ``ToolButton`` (the small emoji button beside its dropdowns), or None outside
    the WebUI; the tab then styles a plain button the same way."""
    if not webui_available():
        return None
    try:
        return _m("ui_components").ToolButton
    except Exception:
        return None


def api_auth_setting() -> str | None:
    """The WebUI's ``--api-auth`` value ("user:pass,user2:pass2"), or None when not set or when
    there is no WebUI. Our routes are added through ``on_app_started`` and so are not covered by
    the WebUI's own check: api.py applies it itself."""
    if not webui_available():
        return None
    return getattr(_m("shared").cmd_opts, "api_auth", None) or None


def request_policy_settings() -> dict[str, Any]:
    """What decides which web pages and host names may use our routes, from the WebUI's own
    options: ``--cors-allow-origins`` (comma-separated), ``--cors-allow-origins-regex``,
    ``--server-name`` and ``--share``. Empty outside the WebUI."""
    if not webui_available():
        return {}
    opts = _m("shared").cmd_opts
    origins = [o.strip() for o in str(getattr(opts, "cors_allow_origins", None) or "").split(",")]
    return {"origins": [o for o in origins if o],
            "origin_regex": getattr(opts, "cors_allow_origins_regex", None) or None,
            "hosts": [h for h in [getattr(opts, "server_name", None)] if h],
            "share": bool(getattr(opts, "share", False))}
