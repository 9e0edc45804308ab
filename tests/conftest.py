"""Shared pytest fixtures. Keep this file small and general; put feature fixtures near their tests."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
FAKE_WEBUI_DIR = TESTS_DIR / "fake_webui"

# Top-level module names the fake WebUI provides; each test gets fresh copies.
_FAKE_TOP_LEVEL = ("modules", "modules_forge", "launch", "backend", "ldm_patched")


def _drop_fake_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _FAKE_TOP_LEVEL:
            del sys.modules[name]


def write_safetensors(path: Path, metadata: dict | None = None, payload: bytes = b"\0\0\0\0") -> Path:
    """A minimal valid .safetensors file (one float32 tensor 'w'); the metadata makes it unique."""
    n = len(payload) // 4
    header = {"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return path


class FakeWebUI:
    """Handle on a freshly imported fake WebUI rooted in a temporary folder."""

    def __init__(self, root: Path, models_dir: Path, flavour: str) -> None:
        import modules.initialize
        from modules import call_queue, paths, script_callbacks, sd_models, shared

        self.root = root
        self.models_dir = models_dir
        self.flavour = flavour
        self.shared, self.sd_models, self.paths = shared, sd_models, paths
        self.call_queue, self.script_callbacks = call_queue, script_callbacks
        modules.initialize.initialize()

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.sd_models.model_path)

    def add_checkpoint(self, relname: str, metadata: dict | None = None, folder: Path | None = None) -> Path:
        """Writes a small checkpoint under models/Stable-diffusion (or ``folder``) and rescans."""
        path = write_safetensors((folder or self.checkpoints_dir) / relname, {"name": relname, **(metadata or {})})
        self.sd_models.list_models()
        return path


@pytest.fixture
def make_fake_webui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory: ``make_fake_webui(args="--ckpt-dir X", flavour="a1111"|"forge"|"neo"|"classic")``."""
    created: list = []

    def make(args: str = "", flavour: str = "a1111") -> FakeWebUI:
        assert not created, "one fake WebUI per test"
        _drop_fake_modules()
        root = tmp_path / "webui"
        (root / "models" / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv("FAKE_WEBUI_ROOT", str(root))
        monkeypatch.setenv("FAKE_WEBUI_ARGS", args)
        monkeypatch.setenv("FAKE_WEBUI_FLAVOUR", flavour)
        monkeypatch.syspath_prepend(str(FAKE_WEBUI_DIR))
        if flavour in ("forge", "neo"):  # Neo keeps Forge's backend and modules_forge
            monkeypatch.syspath_prepend(str(FAKE_WEBUI_DIR / "forge"))
        if flavour == "classic":  # ComfyUI's memory manager, no lazy loading
            monkeypatch.syspath_prepend(str(FAKE_WEBUI_DIR / "classic"))
        from modules import paths
        webui = FakeWebUI(root, Path(paths.models_path), flavour)
        created.append(webui)
        return webui

    yield make
    _drop_fake_modules()


@pytest.fixture
def fake_webui(make_fake_webui) -> FakeWebUI:
    """An AUTOMATIC1111-flavoured fake WebUI with an empty models folder."""
    return make_fake_webui()


@pytest.fixture
def fake_forge(make_fake_webui) -> FakeWebUI:
    """A Forge-flavoured fake WebUI (lazy checkpoint switching, tiles without hashes)."""
    return make_fake_webui(flavour="forge")


@pytest.fixture
def idle_runner():
    """The process's job runner (the tab and the API use it), left idle for the next test."""
    from dreambooth.app.job import runner

    yield runner()
    runner().cancel()
    runner().wait(120)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``bitsandbytes`` need it; the neo lane has none (Forge Neo installs it only
    when started with --bnb), and there they are skipped, saying so. What a user without it
    gets — the 8-bit options refused by field, the card presets' plain AdamW — is tested in
    every lane (tests/test_preflight.py, tests/test_card_presets.py)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        return
    skip = pytest.mark.skip(reason="bitsandbytes is not installed in this lane (Forge Neo without "
                                   "--bnb): the 8-bit options are refused instead")
    for item in items:
        if "bitsandbytes" in item.keywords:
            item.add_marker(skip)
