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

The standalone app (``python -m dreambooth ui``) puts the same policy in front of every route,
gradio's too (:class:`AppGate`): its page, queue and predict routes would otherwise let any page
press Train, and its file routes serve only sample pictures and gradio's temp files. Inside the
WebUI only our routes are guarded; the WebUI's own options govern the rest.
"""
# No "from __future__ import annotations" here: FastAPI reads the handlers' annotations at
# runtime and must see real classes (Request, HTTPBasicCredentials), not strings.
import ipaddress
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from dreambooth.app import service
from dreambooth.app.job import JobBusy, runner
from dreambooth.common.config import ConfigError, FieldError, TrainingConfig, merge_errors
from dreambooth.host import Host, api_auth_setting, get_host, request_policy_settings

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


def refusal(rules: RequestPolicy, host: Optional[str], origin: Optional[str]) -> Optional[str]:
    """Why a request with these ``Host`` and ``Origin`` headers is not the user's own (None: it
    is). One text for our routes and, standalone, for every route of the app."""
    if not rules.host_allowed(host):
        return (f"host {host!r} is not this app's; add it to the WebUI's --server-name or to "
                f"${ALLOWED_HOSTS_ENV} to reach the app by that name")
    if origin is not None and not rules.origin_allowed(origin, host):
        return (f"requests from other web pages ({origin}) are refused; allow a page with the "
                "WebUI's --cors-allow-origins (standalone: --allow-origin)")
    return None


def _make_guard(policy: Callable[[], RequestPolicy]) -> Callable[..., Any]:
    def guard(request: Request) -> None:
        why = refusal(policy(), request.headers.get("host"), request.headers.get("origin"))
        if why is not None:
            _refuse(403, why)
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


# ---------------------------------------------------------------------------------------------
# The standalone app's gate: every route, gradio's as well as ours
# ---------------------------------------------------------------------------------------------
FILE_ROUTE = re.compile(r"/file(?:=|/)(.*)", re.DOTALL)  # gradio's /file=PATH and /file/PATH


def gradio_temp_dir() -> Path:
    """Where gradio 3.41 and 4.40 alike keep what the page is sent: uploads and a copy of every
    file a component shows (the gallery's samples, the exported concepts list)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def _is_under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass(frozen=True)
class FileRule:
    """Which files gradio's file routes may serve standalone: gradio's temp folder, and the runs'
    sample pictures (``<work_root>/<name>/samples/``). Never the folder the app was started from
    (gradio 3 serves all of it) nor the rest of the models folder (checkpoints, LoRA files,
    resume points, configs)."""

    work_root: Path
    temp_dir: Path = field(default_factory=gradio_temp_dir)

    def allows(self, raw: str) -> bool:
        try:
            # a relative path is the working folder's, as gradio reads it; links are followed
            path = Path(os.getcwd(), raw).resolve()
            temp, work = self.temp_dir.resolve(), self.work_root.resolve()
        except (OSError, ValueError, RuntimeError):  # NUL, a loop of links
            return False
        if _is_under(path, temp):
            return True
        parts = path.relative_to(work).parts if _is_under(path, work) else ()
        return len(parts) >= 3 and parts[1] == "samples"


class AppGate:
    """Pure ASGI middleware: the :class:`RequestPolicy` for every request to the standalone app
    (gradio's page, config, predict, queue — a websocket on gradio 3, SSE on 4 —, uploads, file
    routes, and ours), and the :class:`FileRule` for gradio's file routes. A refused HTTP request
    gets 403 and the reason; a refused websocket is closed before it is accepted (code 1008: the
    server answers the handshake with 403)."""

    def __init__(self, app: ASGIApp, policy: RequestPolicy, files: Optional[FileRule] = None) -> None:
        self.app, self.policy, self.files = app, policy, files

    def reason(self, scope: Scope) -> Optional[str]:
        headers = Headers(scope=scope)
        why = refusal(self.policy, headers.get("host"), headers.get("origin"))
        if why is None and self.files is not None:
            path, root = scope.get("path", ""), scope.get("root_path", "")
            match = FILE_ROUTE.fullmatch(path[len(root):] if root and path.startswith(root) else path)
            if match and not self.files.allows(match.group(1)):
                why = "file not served: only the runs' sample pictures and gradio's temp files are"
        return why

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        why = self.reason(scope) if scope["type"] in ("http", "websocket") else None
        if why is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await receive()  # websocket.connect; closing now refuses the handshake
            await send({"type": "websocket.close", "code": 1008, "reason": why[:120]})
        else:
            await JSONResponse({"detail": why}, status_code=403)(scope, receive, send)


def app_gate(policy: RequestPolicy, files: Optional[FileRule] = None) -> Middleware:
    """The gate as a middleware entry for ``FastAPI(middleware=[...])`` — gradio's
    ``launch(app_kwargs={"middleware": [...]})`` —, so that it guards the very first request."""
    return Middleware(AppGate, policy=policy, files=files)


def guard_app(app: Any, policy: RequestPolicy, files: Optional[FileRule] = None) -> None:
    """Make :class:`AppGate` the outermost middleware of an app, even one already serving
    (``launch(prevent_thread_lock=True)`` returns it started): an earlier gate is replaced and
    starlette rebuilds its middleware stack at the next request."""
    kept = [m for m in app.user_middleware if m.cls is not AppGate]
    app.user_middleware = [app_gate(policy, files), *kept]
    app.middleware_stack = None


def on_app_started(demo: Any, app: Any) -> None:
    """``on_app_started`` callback; ``demo`` is None under ``--nowebui``."""
    mount(app)
