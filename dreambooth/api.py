"""HTTP routes under ``/dreambooth/v1``: status, train, cancel, models.

Added to the WebUI's FastAPI app in ``on_app_started`` (and to the standalone app). Routes added
that way are not covered by the WebUI's ``--api-auth``, so this module applies the same rule
itself: with ``--api-auth user:pass[,user2:pass2]`` every route wants HTTP Basic credentials.

Request bodies are read as plain JSON (no pydantic models): the same code runs on fastapi 0.94 /
pydantic 1 (A1111) and fastapi 0.104 / pydantic 2 (Forge), and validation errors come from
``TrainingConfig`` itself, so the API names fields exactly as the config file and the tab do:

    422 {"detail": "invalid training config", "errors": [{"field": "learning_rate", "message": ...}]}
"""
# No "from __future__ import annotations" here: FastAPI reads the handlers' annotations at
# runtime and must see real classes (Request, HTTPBasicCredentials), not strings.
import secrets
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from . import service
from .config import ConfigError, FieldError, TrainingConfig
from .job import JobBusy, runner
from .webui import Host, api_auth_setting, get_host

PREFIX = "/dreambooth/v1"


def parse_credentials(value: str | None) -> dict[str, str]:
    """``"user:pass,user2:pass2"`` (the WebUI's --api-auth format) -> {user: pass}."""
    found: dict[str, str] = {}
    for item in (value or "").split(","):
        if ":" in item:
            user, password = item.strip().split(":", 1)
            found[user] = password
    return found


def _errors_response(errors: List[FieldError], status: int = 422) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "detail": "invalid training config",
        "errors": [{"field": e.field, "message": e.message} for e in errors]})


def _make_auth(credentials: dict[str, str]) -> Callable[..., Any]:
    basic = HTTPBasic(auto_error=False)

    def check(given: Optional[HTTPBasicCredentials] = Depends(basic)) -> None:
        if not credentials:
            return
        if given is not None and given.username in credentials and secrets.compare_digest(
                given.password.encode(), credentials[given.username].encode()):
            return
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return check


def make_routes(host_factory: Callable[[], Host]) -> dict[str, Callable[..., Any]]:
    """The four handlers (plain functions of a Request), for any FastAPI app."""

    def status() -> Dict[str, Any]:
        return service.status()

    async def train(request: Request, resume: bool = False):
        try:
            body = await request.json()
        except Exception:
            return _errors_response([FieldError("config", "the body must be a JSON object")])
        host = host_factory()
        if isinstance(body, dict) and str(body.get("models_dir") or "").strip():
            # Outputs always go to the host's folders; a client may not point them elsewhere.
            given = Path(str(body["models_dir"])).expanduser().resolve()
            if given != host.models_dir().resolve():
                return _errors_response([FieldError(
                    "models_dir", "outputs go to the WebUI's models folder; leave it empty")])
        try:
            config = TrainingConfig.from_dict(body)
            job_id = service.start_training(config, host, resume=resume)
        except ConfigError as exc:
            return _errors_response(exc.errors)
        except JobBusy as exc:
            return JSONResponse(status_code=409, content={"detail": str(exc)})
        return {"job_id": job_id, "status": service.status()}

    def cancel() -> Dict[str, Any]:
        return {"cancelled": runner().cancel(), "status": service.status()}

    def models() -> Dict[str, Any]:
        host = host_factory()
        return {
            "checkpoints": [{"title": e.title, "name": e.name, "filename": e.filename,
                             "hash": e.hash} for e in host.list_checkpoints()],
            "vaes": [str(p) for p in host.list_vaes()],
            "runs": [r.to_dict() for r in service.list_runs(host)],
            "output_dir": str(host.output_dir()),
        }

    return {"status": status, "train": train, "cancel": cancel, "models": models}


def mount(app: Any, host: Host | None = None, credentials: dict[str, str] | None = None) -> None:
    """Adds the routes to a FastAPI app (the WebUI's in ``on_app_started``, or the standalone
    one). ``credentials`` default to the WebUI's --api-auth; a second call adds nothing."""
    from fastapi import Depends

    if any(getattr(r, "path", "") == f"{PREFIX}/status" for r in getattr(app, "routes", [])):
        return
    if credentials is None:
        credentials = parse_credentials(api_auth_setting())
    routes = make_routes((lambda: host) if host is not None else get_host)
    deps = [Depends(_make_auth(credentials))] if credentials else None
    methods = {"status": "GET", "train": "POST", "cancel": "POST", "models": "GET"}
    for name, handler in routes.items():
        app.add_api_route(f"{PREFIX}/{name}", handler, methods=[methods[name]], dependencies=deps)


def on_app_started(demo: Any, app: Any) -> None:
    """``on_app_started`` callback; ``demo`` is None under ``--nowebui``."""
    mount(app)
