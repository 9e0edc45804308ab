"""Errors for people: a FieldError names the option (as the config, the tab and the API name
it) and what to do; a ConfigError carries one for each wrong option."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FieldError:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ConfigError(ValueError):
    """One or more options are wrong; ``errors`` names each field and what to do."""

    def __init__(self, errors: list[FieldError]):
        self.errors = list(errors)
        super().__init__("invalid training config:\n" + "\n".join(f"  - {e}" for e in errors))


def _error_root(name: str) -> str:
    """The option a field error is about, as the config names it: an error inside a
    concepts_list file ("concepts_list (x.json): concepts[0].instance_prompt") is about
    ``concepts``; any other error about its own field."""
    for key in ("concepts_list", "concepts"):
        if name == key or name.startswith(key + " ("):
            return "concepts"
    return name


def merge_errors(first: list[FieldError], later: list[FieldError]) -> list[FieldError]:
    """``first`` (e.g. parse errors) then the ``later`` errors (e.g. a preflight of the partial
    config) that are not about a field already in ``first``, each (field, message) once.

    A later error is dropped when its field is one of ``first``'s or lies inside one
    (``concepts[0].class_prompt`` inside ``concepts[0]`` or ``concepts``): the partial config
    held a default there, and an error about that default would only mislead."""
    failed = {_error_root(e.field) for e in first} | {e.field for e in first}

    def inside(name: str) -> bool:
        return any(name == f or name.startswith((f + ".", f + "[")) for f in failed)

    merged: dict[tuple[str, str], FieldError] = {}
    for error in list(first) + [e for e in later if not inside(e.field)]:
        merged.setdefault((error.field, error.message), error)
    return list(merged.values())
