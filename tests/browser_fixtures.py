"""What the browser tests share: Debian's Chromium driven by Playwright (no browser download),
where screenshots go, a free port."""
from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
SHOTS = REPO_ROOT / "artifacts" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no {CHROMIUM}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (Playwright's Browser), closed afterwards; screenshots folder made."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def served(argv: list[str], ready_path: str, log_path: Path, env: dict[str, str] | None = None
           ) -> Iterator[str]:
    """A server process (``argv`` gets ``--port N``) until ``ready_path`` answers; yields its
    URL; stopped (terminate, then kill) afterwards. Its output goes to ``log_path``."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *argv, "--port", str(port)], cwd=REPO_ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.time() + 90
            while True:
                try:
                    urllib.request.urlopen(url + ready_path, timeout=2).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise AssertionError(log_path.read_text()[-3000:])
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
