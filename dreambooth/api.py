"""HTTP routes under ``/dreambooth/v1``: status, train, cancel, models.

Added to the WebUI's FastAPI app in ``on_app_started`` (and to the standalone app). Routes added
that way are not covered by the WebUI's ``--api-auth``, so this module applies the same rule
itself: with ``--api-auth user:pass[,user2:pass2]`` every route wants HTTP Basic credentials.

Request bodies are read as plain JSON (no pydantic models): the same code runs on fastapi 0.94 /
pydantic 1 (A1111) and fastapi 0.104 / pydantic 2 (Forge), and validation errors come from
``TrainingConfig`` itself, so the API names fields exactly as the config file and the tab do:

    422 {"detail": "invalid training config", "errors": [{"field": "learning_rate", "message": ...}]}

One response names every wrong field: when some fields do not parse (an unknown key, a value of
the wrong type) the rest of the body is still checked like a real start (ranges, base model,
folders) and both lists are returned together.

The API is the user's alone (:class:`RequestPolicy`): a web page on another site must not start or
cancel a job in the user's browser. So every route refuses a request whose ``Origin`` is another
site's (403) — same semantics as the WebUI's ``--cors-allow-origins`` / ``--cors-allow-origins-regex``,
which extend the list — and a ``Host`` that is not this machine's (403: DNS rebinding); POST bodies
must be ``application/json`` (415: a "simple" cross-site form or text/plain post is never read)
and at most 1 MiB (413).
"""
# No "from __future__ import annotations" here: FastAPI reads the handlers' annotations at
# runtime and must see real classes (Request, HTTPBasicCredentials), not strings.
import ipaddress
import json
import os
import re
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from . import service
from .config import ConfigError, FieldError, TrainingConfig, merge_errors
from .job import JobBusy, runner
from .webui import Host, api_auth_setting, get_host, request_policy_settings

PREFIX = "/dreambooth/v1"
MAX_BODY_BYTES = 1 << 20  # a training config is a few KB
ALLOWED_HOSTS_ENV = "DREAMBOOTH_ALLOWED_HOSTS"  # extra host names (a reverse proxy's), comma-separated


def _split_host(value: str) -> Tuple[str, str]:
    """("host", "port") of a Host header or an origin's netloc; IPv6 brackets removed."""
    value = value.strip().lower()
    match = re.fullmatch(r"\[([0-9a-f:.]+)\](?::(\d+))?|([^:]*)(?::(\d+))?", value)
    if not match:
        return value, ""
    return (match.group(1) or match.group(3) or ""), (match.group(2) or match.group(4) or "")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class RequestPolicy:
    """Which pages (``Origin``) and host names (``Host``) may use the routes.

    Allowed origins: the app's own (the Origin's host and port equal the Host header), the
    listed ``origins`` and those matching ``origin_regex`` (the WebUI's --cors-allow-origins and
    --cors-allow-origins-regex). Requests without an Origin (curl, scripts, same-origin GETs)
    pass. Allowed hosts: IP addresses (DNS rebinding needs a name), localhost, ``hosts`` (the
    WebUI's --server-name, $DREAMBOOTH_ALLOWED_HOSTS), the hosts of the allowed origins, and
    ``*.gradio.live`` with --share."""

    origins: Tuple[str, ...] = ()
    origin_regex: Optional[str] = None
    hosts: Tuple[str, ...] = ()
    share: bool = False

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "RequestPolicy":
        extra = [h.strip() for h in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",") if h.strip()]
        return cls(origins=tuple(o.strip().rstrip("/").lower() for o in settings.get("origins", ())),
                   origin_regex=settings.get("origin_regex") or None,
                   hosts=tuple(h.lower() for h in [*settings.get("hosts", ()), *extra]),
                   share=bool(settings.get("share")))

    def host_allowed(self, host_header: Optional[str]) -> bool:
        name, _ = _split_host(host_header or "")
        if not name:
            return False
        if _is_ip(name) or name == "localhost" or name.endswith(".localhost"):
            return True
        if name in self.hosts or name in {_split_host(urlsplit(o).netloc)[0] for o in self.origins}:
            return True
        return self.share and name.endswith(".gradio.live")

    def origin_allowed(self, origin: str, host_header: Optional[str]) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if not origin or origin == "null":  # sandboxed frames and file:// pages send "null"
            return False
        if origin in self.origins:
            return True
        if self.origin_regex and re.fullmatch(self.origin_regex, origin, flags=re.IGNORECASE):
            return True
        parts = urlsplit(origin)
        default = {"http": "80", "https": "443"}.get(parts.scheme, "")
        own_name, own_port = _split_host(host_header or "")
        name, port = _split_host(parts.netloc)
        return bool(name) and name == own_name and (port or default) == (own_port or default)


def _refuse(status: int, detail: str) -> None:
    raise HTTPException(status_code=status, detail=detail)


def _make_guard(policy: Callable[[], RequestPolicy]) -> Callable[..., Any]:
    def guard(request: Request) -> None:
        rules = policy()
        host = request.headers.get("host")
        if not rules.host_allowed(host):
            _refuse(403, f"host {host!r} is not this app's; add it to --server-name or "
                         f"${ALLOWED_HOSTS_ENV} to reach the app by that name")
        origin = request.headers.get("origin")
        if origin is not None and not rules.origin_allowed(origin, host):
            _refuse(403, f"requests from other web pages ({origin}) are refused; allow a page with "
                         "the WebUI's --cors-allow-origins")
        if request.method == "POST":
            content_type = request.headers.get("content-type")
            if content_type and content_type.split(";")[0].strip().lower() != "application/json":
                _refuse(415, "the body must be JSON (Content-Type: application/json)")

    return guard


async def _json_body(request: Request) -> Any:
    """The request's JSON body: application/json, at most MAX_BODY_BYTES (checked while it is
    read, whatever Content-Length says)."""
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        _refuse(415, "the body must be JSON (Content-Type: application/json)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        _refuse(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            _refuse(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return json.loads(b"".join(chunks).decode("utf-8"))


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


def _models_dir_errors(body: Any, host: Host) -> List[FieldError]:
    """Outputs always go to the host's folders; a client may not point them elsewhere."""
    if not (isinstance(body, dict) and str(body.get("models_dir") or "").strip()):
        return []
    try:
        given = Path(str(body["models_dir"])).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):  # NUL, unknown ~user, a loop of links
        given = None
    if given == host.models_dir().resolve():
        return []
    return [FieldError("models_dir", "outputs go to the WebUI's models folder; leave it empty")]


def _all_errors(partial: TrainingConfig, errors: List[FieldError], host: Host,
                resume: bool) -> List[FieldError]:
    """``errors`` (the body's: fields that do not parse, a foreign models_dir) and everything
    the preflight finds in the rest of the body (ranges, base model, folders ...), so that one
    response names every wrong field. Checks only: nothing is started or written. A body that is
    not a JSON object at all gets just that error."""
    if any(e.field == "config" for e in errors):
        return errors
    partial = replace(partial, models_dir="")  # the host's folders, as for a real start
    try:
        _, later = service.preflight(partial, host, resume=resume)
    except (OSError, ValueError):  # the body's own errors are still worth showing
        later = []
    return merge_errors(errors, later)


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

    async def train(request: Request, resume: bool = False, card: str = ""):
        try:
            body = await _json_body(request)
        except HTTPException:
            raise
        except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting
            return _errors_response([FieldError("config", "the body must be a JSON object")])
        host = host_factory()
        errors = _models_dir_errors(body, host)
        config, parse_errors = TrainingConfig.parse(body)
        errors += parse_errors
        if errors:
            return _errors_response(_all_errors(config, errors, host, resume))
        try:
            preset, notes = None, []
            if card:  # the card-size preset over the body's settings, each change said
                resolved, _ = service.prepare(config, host, resume=resume)
                config, notes, preset = service.apply_card(card, resolved)
            job_id = service.start_training(config, host, resume=resume, notes=notes)
        except ConfigError as exc:
            return _errors_response(exc.errors)
        except JobBusy as exc:
            return JSONResponse(status_code=409, content={"detail": str(exc)})
        answer = {"job_id": job_id, "status": service.status()}
        if preset is not None:
            answer["card"] = {"card": card, "rung": preset.rung, "fits": preset.fits,
                              "estimate_gb": preset.figures,
                              "changes": [{"field": f, "before": b, "after": a}
                                          for f, b, a in preset.changes],
                              "kept": list(preset.kept)}
        return answer

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


def mount(app: Any, host: Host | None = None, credentials: dict[str, str] | None = None,
          policy: RequestPolicy | None = None) -> None:
    """Adds the routes to a FastAPI app (the WebUI's in ``on_app_started``, or the standalone
    one). ``credentials`` default to the WebUI's --api-auth, ``policy`` to the WebUI's CORS and
    server-name options; a second call adds nothing."""
    if any(getattr(r, "path", "") == f"{PREFIX}/status" for r in getattr(app, "routes", [])):
        return
    if credentials is None:
        credentials = parse_credentials(api_auth_setting())
    routes = make_routes((lambda: host) if host is not None else get_host)
    rules = (lambda: policy) if policy is not None else (
        lambda: RequestPolicy.from_settings(request_policy_settings()))
    deps = [Depends(_make_auth(credentials))] if credentials else []
    deps.append(Depends(_make_guard(rules)))
    methods = {"status": "GET", "train": "POST", "cancel": "POST", "models": "GET"}
    for name, handler in routes.items():
        app.add_api_route(f"{PREFIX}/{name}", handler, methods=[methods[name]], dependencies=deps)


def drop_wildcard_cors(app: Any) -> bool:
    """Remove gradio 3's ``Access-Control-Allow-Origin: *`` middleware from a standalone app (the
    WebUI does the same to its own app): the page is served from the same origin and needs none.
    True when one was removed."""
    kept = [m for m in app.user_middleware if getattr(m.cls, "__name__", "") != "CORSMiddleware"]
    if len(kept) == len(app.user_middleware):
        return False
    app.user_middleware = kept
    app.middleware_stack = None  # rebuilt at the next request
    return True


def on_app_started(demo: Any, app: Any) -> None:
    """``on_app_started`` callback; ``demo`` is None under ``--nowebui``."""
    mount(app)
