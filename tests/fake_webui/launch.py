"""Fake of the WebUI's ``launch`` module as ``install.py`` sees it (``modules/launch_utils.py``).

``run_pip`` never runs pip: it records each call (and the constraints file it names) to
``$FAKE_WEBUI_PIP_LOG`` and to ``pip_calls``; ``$FAKE_WEBUI_PIP_FAIL`` makes it fail like pip.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import sys

_parser = argparse.ArgumentParser(add_help=False)
_parser.add_argument("--skip-install", action="store_true")
_parser.add_argument("--skip-prepare-environment", action="store_true")
_parser.add_argument("--reinstall-torch", action="store_true")
args, _ = _parser.parse_known_args(shlex.split(os.environ.get("FAKE_WEBUI_ARGS", "")))

python = sys.executable
index_url = os.environ.get("INDEX_URL", "")
default_command_live = os.environ.get("WEBUI_LAUNCH_LIVE_OUTPUT") == "1"
pip_calls: list = []  # fake only

_FAILURES = {
    "network": (
        "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection "
        "broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: Failed to "
        "establish a new connection: [Errno -3] Temporary failure in name resolution')': /simple/{pkg}/\n"
        "ERROR: Could not find a version that satisfies the requirement {req} (from versions: none)\n"
        "ERROR: No matching distribution found for {req}\n"
    ),
    "conflict": (
        "ERROR: Cannot install {req} because these package versions have conflicting dependencies.\n"
        "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/\n"
    ),
}


def is_installed(package):
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def _constraints_of(command):
    m = re.search(r'(?:^|\s)(?:-c|--constraint)\s+(?:"([^"]+)"|(\S+))', command)
    if not m:
        return None, None
    path = m.group(1) or m.group(2)
    try:
        with open(path, encoding="utf8") as f:
            return path, f.read()
    except OSError:
        return path, None


def run_pip(command, desc=None, live=default_command_live):
    if args.skip_install:
        return
    index_url_line = f" --index-url {index_url}" if index_url != "" else ""
    full = f'"{python}" -m pip {command} --prefer-binary{index_url_line}'
    if desc is not None:
        print(f"Installing {desc}")
    path, constraints = _constraints_of(command)
    record = {"command": command, "desc": desc, "full": full, "constraints_path": path, "constraints": constraints}
    pip_calls.append(record)
    log = os.environ.get("FAKE_WEBUI_PIP_LOG")
    if log:
        with open(log, "a", encoding="utf8") as f:
            f.write(json.dumps(record) + "\n")
    failure = os.environ.get("FAKE_WEBUI_PIP_FAIL")
    if failure:
        req = next((t for t in shlex.split(command) if t not in ("install", "-U", "--upgrade") and not t.startswith("-")), "?")
        pkg = re.split(r"[<>=!~ ;\[]", req)[0]
        error_bits = [
            f"Couldn't install {desc}.",
            f"Command: {full}",
            "Error code: 1",
            "stdout: Collecting " + req,
            "stderr: " + _FAILURES.get(failure, _FAILURES["conflict"]).format(req=req, pkg=pkg),
        ]
        raise RuntimeError("\n".join(error_bits))
    return ""
