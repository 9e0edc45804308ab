"""install.py installs only the extension's own packages, sized to each host, and never the host's."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAKE_WEBUI_DIR, REPO_ROOT

# Loaded by path, as the WebUI runs it: install.py is a script, not part of the package.
_spec = importlib.util.spec_from_file_location("dreambooth_install_script", REPO_ROOT / "install.py")
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)

# What each host has installed after its own start-up (its pins and their dependencies).
A1111 = {
    "torch": "2.1.2+cu121", "torchvision": "0.16.2+cu121", "transformers": "4.30.2", "accelerate": "0.21.0",
    "gradio": "3.41.2", "safetensors": "0.4.2", "Pillow": "9.5.0", "numpy": "1.26.2", "fastapi": "0.94.0",
    "pydantic": "1.10.17", "huggingface-hub": "0.25.2", "ftfy": "6.2.0", "regex": "2024.5.15", "tqdm": "4.66.4",
}
FORGE = {
    "torch": "2.3.1+cu121", "torchvision": "0.18.1+cu121", "transformers": "4.46.1", "accelerate": "0.31.0",
    "gradio": "4.40.0", "safetensors": "0.4.2", "Pillow": "9.5.0", "numpy": "1.26.2", "fastapi": "0.104.1",
    "pydantic": "2.8.2", "huggingface_hub": "0.26.2", "diffusers": "0.31.0", "ftfy": "6.2.0", "regex": "2024.5.15",
    "tqdm": "4.66.4",
}
REFORGE = {
    "torch": "2.9.0+cu128", "torchvision": "0.24.0+cu128", "transformers": "4.48.1", "accelerate": "0.21.0",
    "gradio": "3.41.2", "safetensors": "0.5.2", "pillow": "10.4.0", "numpy": "1.26.2", "fastapi": "0.94.0",
    "pydantic": "1.10.17", "huggingface-hub": "0.27.1", "diffusers": "0.32.2", "ftfy": "6.2.0", "regex": "2024.5.15",
    "tqdm": "4.66.4",
}

# Forge Neo (its requirements.txt and launcher, 2026): bitsandbytes only with --bnb, no diffusers
# pinned by us (it pins 0.37.1 itself)
NEO = {
    "torch": "2.11.0+cu130", "torchvision": "0.26.0+cu130", "transformers": "4.57.6", "accelerate": "1.14.0",
    "gradio": "4.40.0", "safetensors": "0.8.0", "pillow": "12.3.0", "numpy": "2.3.5", "fastapi": "0.127.1",
    "pydantic": "2.10.6", "huggingface-hub": "0.36.2", "diffusers": "0.37.1", "regex": "2025.11.3",
    "tqdm": "4.70.0",
}
# Forge Classic 1.12: gradio 3, transformers 4.30.2, neither accelerate nor diffusers
CLASSIC = {
    "torch": "2.9.1+cu130", "torchvision": "0.24.1+cu130", "transformers": "4.30.2", "gradio": "3.43.2",
    "safetensors": "0.5.3", "pillow": "11.2.1", "numpy": "1.26.4", "fastapi": "0.114.2", "pydantic": "1.10.22",
    "huggingface-hub": "0.30.2", "regex": "2024.11.6", "tqdm": "4.67.1",
}


def requirements(installed: dict, **options) -> list[str]:
    return [req for req, _ in install.plan_installs(installed, **options)]


class FakeLaunch:
    """In-process stand-in with the real run_pip's contract (records what it was asked)."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list = []
        self.fail = fail
        self.args = type("Args", (), {"skip_install": False})()

    def run_pip(self, command: str, desc: str | None = None):
        print(f"Installing {desc}")  # as the real run() prints its desc
        path = command.split(' -c "')[1].rstrip('"')
        self.calls.append((command, Path(path).read_text()))
        if self.fail == "network":
            raise RuntimeError("Couldn't install x.\nstderr: WARNING: Retrying ... Failed to establish a new connection: "
                               "[Errno 101] Network is unreachable\nERROR: No matching distribution found for x")
        if self.fail == "conflict":
            raise RuntimeError("Couldn't install x.\nstderr: ERROR: ResolutionImpossible: for help visit ...")


@pytest.mark.parametrize("host, expected", [
    (A1111, ["bitsandbytes==0.45.5", "diffusers==0.31.0", "lycoris-lora>=4.1,<4.2", "prodigyopt", "onnxruntime"]),
    (FORGE, ["bitsandbytes>=0.49,<0.50", "lycoris-lora>=4.1,<4.2", "prodigyopt", "onnxruntime"]),
    (REFORGE, ["bitsandbytes>=0.50,<0.51", "lycoris-lora>=4.1,<4.2", "prodigyopt", "onnxruntime"]),
    (CLASSIC, ["accelerate==0.21.0", "bitsandbytes>=0.50,<0.51", "diffusers==0.31.0", "lycoris-lora>=4.1,<4.2",
               "prodigyopt", "ftfy", "onnxruntime"]),
])
def test_plan_per_host(host, expected):
    assert requirements(host) == expected


def test_neo_keeps_bitsandbytes_its_own_choice():
    """Neo installs bitsandbytes only when started with --bnb: never added by us there (the
    8-bit options then say so), and a release it installed is left as it is."""
    assert requirements(NEO, host_manages_bitsandbytes=True) == [
        "lycoris-lora>=4.1,<4.2", "prodigyopt", "ftfy", "onnxruntime"]
    assert requirements({**NEO, "bitsandbytes": "0.40.0"}, host_manages_bitsandbytes=True) == [
        "lycoris-lora>=4.1,<4.2", "prodigyopt", "ftfy", "onnxruntime"]
    # told by the launcher's arguments: Neo has --bnb (its first releases --disable-bnb)
    for option in ("bnb", "disable_bnb"):
        launch = FakeLaunch()
        setattr(launch.args, option, False)
        assert install.host_manages_bitsandbytes(launch)
        install.run({**NEO, "lycoris-lora": "4.1.3", "prodigyopt": "1.1.2", "ftfy": "6.3"}, launch)
        assert [c.split(" -c ")[0] for c, _ in launch.calls] == ['install "onnxruntime"']
    assert not install.host_manages_bitsandbytes(FakeLaunch())


def test_an_installed_onnxruntime_gpu_counts():
    assert "onnxruntime" not in requirements({**NEO, "onnxruntime-gpu": "1.24.0"})
    assert "onnxruntime" not in requirements({**NEO, "onnxruntime": "1.24.0"})


def test_accelerate_where_the_host_has_none_fits_its_transformers():
    assert requirements(CLASSIC)[0] == "accelerate==0.21.0"
    host = {k: v for k, v in NEO.items() if k != "accelerate"}
    assert requirements(host)[0] == "accelerate>=1.0,<2"
    assert not any(r.startswith("accelerate") for r in requirements(A1111))


def test_bitsandbytes_follows_torch():
    for torch, req in [("2.1.2", "bitsandbytes==0.45.5"), ("2.2.2+cu121", "bitsandbytes==0.47.0"),
                       ("2.3.1", "bitsandbytes>=0.49,<0.50"), ("2.4.0", "bitsandbytes>=0.50,<0.51"),
                       ("2.13.0+cpu", "bitsandbytes>=0.50,<0.51")]:
        assert requirements({**A1111, "torch": torch, "diffusers": "0.31.0", "prodigyopt": "1.1",
                             "lycoris-lora": "4.1.3", "onnxruntime": "1.26.0"}) == [req]


def test_kept_when_it_fits_replaced_when_it_does_not():
    # Forge pins bitsandbytes 0.43.3 itself: it works with its torch, so it is left alone
    assert requirements({**FORGE, "bitsandbytes": "0.43.3", "prodigyopt": "1.1.2",
                         "lycoris_lora": "4.1.3", "onnxruntime": "1.26.0"}) == []
    # a bitsandbytes too new for torch 2.1 and a diffusers that cannot import with transformers 4.30
    plan = install.plan_installs({**A1111, "bitsandbytes": "0.50.2", "diffusers": "0.35.1", "prodigyopt": "1.1.2",
                                  "lycoris-lora": "4.1.0", "onnxruntime": "1.26.0"})
    assert [r for r, _ in plan] == ["bitsandbytes==0.45.5", "diffusers==0.31.0"]
    assert "does not fit torch 2.1.2+cu121" in plan[0][1] and "transformers 4.30.2" in plan[1][1]


def test_newer_transformers_get_a_diffusers_range_below_hub_1x():
    host = {k: v for k, v in REFORGE.items() if k != "diffusers"}
    assert requirements({**host, "bitsandbytes": "0.50.2", "prodigyopt": "1.1.2",
                         "lycoris-lora": "4.1.3", "onnxruntime": "1.26.0"}) == ["diffusers>=0.31,<0.40"]
    assert install.diffusers_choice("5.0.0")[0] == "diffusers>=0.31"


def test_lycoris_kept_in_its_range_replaced_outside():
    fits = {**FORGE, "bitsandbytes": "0.43.3", "prodigyopt": "1.1.2", "onnxruntime": "1.26.0"}
    assert requirements({**fits, "lycoris-lora": "4.1.9"}) == []
    plan = install.plan_installs({**fits, "lycoris-lora": "3.1.0"})
    assert [r for r, _ in plan] == ["lycoris-lora>=4.1,<4.2"] and "3.1.0" in plan[0][1]


def test_constraints_pin_every_installed_host_package_and_nothing_else():
    text = install.constraints_text(A1111)
    lines = text.splitlines()
    assert "torch==2.1.2+cu121" in lines and "torchvision==0.16.2+cu121" in lines
    assert "transformers==4.30.2" in lines and "pillow==9.5.0" in lines and "huggingface-hub==0.25.2" in lines
    assert len(lines) == 11 and not any(x.startswith(("diffusers", "bitsandbytes", "ftfy")) for x in lines)


def test_every_pip_call_carries_the_constraints_and_one_line_per_package(capsys):
    launch = FakeLaunch()
    assert install.run(A1111, launch) == 0
    assert [c.split(" -c ")[0] for c, _ in launch.calls] == [
        'install "bitsandbytes==0.45.5"', 'install "diffusers==0.31.0"', 'install "lycoris-lora>=4.1,<4.2"',
        'install "prodigyopt"', 'install "onnxruntime"']
    assert all(constraints == install.constraints_text(A1111) for _, constraints in launch.calls)
    out = capsys.readouterr().out.splitlines()
    assert out == ["Installing bitsandbytes==0.45.5 for DreamBooth (missing; fits torch 2.1.2+cu121)",
                   "Installing diffusers==0.31.0 for DreamBooth (missing; fits transformers 4.30.2)",
                   "Installing lycoris-lora>=4.1,<4.2 for DreamBooth (missing; trains LoRA, LoCon, LoHa, LoKr)",
                   "Installing prodigyopt for DreamBooth (missing)",
                   "Installing onnxruntime for DreamBooth (missing; runs the WD tagger captioners)"]


def test_nothing_happens_when_everything_is_present(capsys):
    launch = FakeLaunch()
    install.run({**REFORGE, "bitsandbytes": "0.50.2", "prodigyopt": "1.1.2", "lycoris-lora": "4.1.3",
                 "onnxruntime": "1.26.0"}, launch)
    assert launch.calls == [] and capsys.readouterr().out == ""


def test_network_failure_is_one_clear_message(capsys):
    launch = FakeLaunch(fail="network")
    assert install.run(A1111, launch) == 0
    assert len(launch.calls) == 1  # no point trying the others
    out = capsys.readouterr().out
    assert "could not reach the package index" in out
    assert "bitsandbytes==0.45.5, diffusers==0.31.0, lycoris-lora>=4.1,<4.2, prodigyopt, onnxruntime" in out and "Traceback" not in out


def test_other_pip_failures_are_reported_per_package(capsys):
    launch = FakeLaunch(fail="conflict")
    install.run(A1111, launch)
    assert len(launch.calls) == 5
    out = capsys.readouterr().out
    assert out.count("pip could not install") == 5 and "ResolutionImpossible" in out


def test_skip_install_does_nothing():
    launch = FakeLaunch()
    launch.args.skip_install = True
    install.run(A1111, launch)
    assert launch.calls == []


# --- as the WebUI runs it: a subprocess with the WebUI folder on PYTHONPATH ------------------------

def _fake_site(folder: Path, versions: dict) -> Path:
    """dist-info folders that make importlib.metadata report the given versions."""
    for name, version in versions.items():
        d = folder / f"{name.replace('-', '_')}-{version}.dist-info"
        d.mkdir(parents=True)
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


def _run_install(tmp_path: Path, extra_path: list, isolated: bool, fail: str | None = None):
    log = tmp_path / "pip.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_WEBUI")}
    env.update(PYTHONPATH=os.pathsep.join([str(FAKE_WEBUI_DIR), *map(str, extra_path)]), FAKE_WEBUI_PIP_LOG=str(log))
    if fail:
        env["FAKE_WEBUI_PIP_FAIL"] = fail
    # -S hides the lane's own site-packages so that only the fake host's versions are seen
    cmd = [sys.executable, *(["-S"] if isolated else []), str(REPO_ROOT / "install.py")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def test_subprocess_on_an_a1111_host(tmp_path):
    site = _fake_site(tmp_path / "site", A1111)
    proc, calls = _run_install(tmp_path, [site], isolated=True)
    assert proc.returncode == 0, proc.stderr
    assert [c["command"].split(" -c ")[0] for c in calls] == [
        'install "bitsandbytes==0.45.5"', 'install "diffusers==0.31.0"', 'install "lycoris-lora>=4.1,<4.2"',
        'install "prodigyopt"', 'install "onnxruntime"']
    assert all("torch==2.1.2+cu121" in c["constraints"].splitlines() for c in calls)
    assert proc.stdout.splitlines()[0] == "Installing bitsandbytes==0.45.5 for DreamBooth (missing; fits torch 2.1.2+cu121)"
    assert not list(Path(os.path.dirname(calls[0]["constraints_path"])).glob(Path(calls[0]["constraints_path"]).name))


def test_subprocess_without_network_prints_a_message_not_a_traceback(tmp_path):
    site = _fake_site(tmp_path / "site", FORGE)
    proc, calls = _run_install(tmp_path, [site], isolated=True, fail="network")
    assert proc.returncode == 0 and "Traceback" not in proc.stdout + proc.stderr
    assert "could not reach the package index" in proc.stdout and len(calls) == 1


def test_subprocess_in_this_lane_installs_exactly_what_the_plan_says(tmp_path):
    proc, calls = _run_install(tmp_path, [], isolated=False)
    assert proc.returncode == 0, proc.stderr
    assert [c["command"].split(" -c ")[0] for c in calls] == [
        f'install "{req}"' for req, _ in install.plan_installs(install.installed_versions())]
