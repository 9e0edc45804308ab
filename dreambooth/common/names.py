"""The one place that turns a user's model name into file and folder names.

The CLI, the tab and the API all name outputs through :func:`sanitize_model_name`, so
``con`` is ``_con`` and ``a:b`` is ``a_b`` everywhere, for the work folder and the checkpoint alike.
"""
from __future__ import annotations

import re
import unicodedata

MAX_NAME_LENGTH = 120
MAX_NAME_BYTES = 200  # file systems allow 255 bytes; room is left for "_<step>.safetensors"
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                     *(f"lpt{i}" for i in range(1, 10))}
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*]')


def control_characters(text: str) -> list[str]:
    """The control characters in ``text`` (NUL, escape, newlines...), as ``\\xNN`` for messages,
    and lone surrogates (not text at all: no file system can store them) as ``\\udNNN``."""
    found = {f"\\x{ord(c):02x}" for c in text if unicodedata.category(c) == "Cc"}
    found |= {f"\\u{ord(c):04x}" for c in text if unicodedata.category(c) == "Cs"}
    return sorted(found)


def sanitize_model_name(name: str) -> str:
    """A model name made safe as one folder / file name; raises ValueError when it cannot be.

    Refused (the user must change it): empty names, names made only of dots, control characters
    (NUL, newlines...), and anything with a path separator (nothing may escape the models folder).
    Characters Windows forbids become ``_``; surrounding spaces and trailing dots go; names Windows
    reserves (``con``, ``nul``, ``com1``...) get a leading ``_``.
    """
    if not isinstance(name, str):
        raise ValueError("model name must be text")
    bad = control_characters(name)
    if bad:
        raise ValueError(f"model name contains control characters ({', '.join(bad)})")
    cleaned = name.strip()
    if not cleaned:
        raise ValueError("model name is empty")
    # Without separators, ".." can only escape as the whole name, which the dot check below refuses.
    if "/" in cleaned or "\\" in cleaned:
        raise ValueError(f"model name {name!r} must not contain '/' or '\\'")
    cleaned = _WINDOWS_FORBIDDEN.sub("_", cleaned).rstrip(". ")
    if not cleaned or set(cleaned) <= {".", "_"}:
        raise ValueError(f"model name {name!r} has no usable characters")
    if cleaned.split(".")[0].strip().lower() in _WINDOWS_RESERVED:
        cleaned = "_" + cleaned
    if len(cleaned) > MAX_NAME_LENGTH or len(cleaned.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"model name is longer than {MAX_NAME_LENGTH} characters "
                         f"({MAX_NAME_BYTES} bytes in UTF-8)")
    return cleaned


def sanitize_subfolder(path: str) -> str:
    """A relative subfolder such as ``dreambooth/people``: each part sanitised; ``""`` stays ``""``."""
    parts = [p for p in re.split(r"[\\/]+", (path or "").strip()) if p not in ("", ".")]
    return "/".join(sanitize_model_name(p) for p in parts)


def output_file_name(model_name: str, suffix: str = "", extension: str = "safetensors") -> str:
    """``<sanitised name><suffix>.<extension>``: the trained model's file name (suffix ``_500``
    for an intermediate save)."""
    return f"{sanitize_model_name(model_name)}{suffix}.{extension}"
