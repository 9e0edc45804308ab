"""HTTP routes under /dreambooth/v1. PLACEHOLDER: only the status route for now."""
from __future__ import annotations

from typing import Any

PREFIX = "/dreambooth/v1"


def status() -> dict[str, Any]:
    return {"phase": "idle"}


def mount(app: Any) -> None:
    """Adds the routes to the WebUI's FastAPI app (``on_app_started``)."""
    app.add_api_route(f"{PREFIX}/status", status, methods=["GET"])


def on_app_started(demo: Any, app: Any) -> None:
    """``on_app_started`` callback; ``demo`` is None under ``--nowebui``."""
    mount(app)
