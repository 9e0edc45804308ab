"""Reading a config or concepts-list file: JSON, or the seed's Python-literal form (with ``#``
comments, read by ast.literal_eval, which runs no code); nesting far beyond a config's refused
before anything recurses through it. And the config's paths and prompts checked for control
characters."""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

from dreambooth.common.errors import ConfigError, FieldError

# A config nests four levels at most (options > concepts > concept > value). Far deeper is not a
# config, and reading it would recurse once per level until Python's stack runs out.
MAX_NESTING = 32
TOO_DEEP = "nested too deeply to be a training config"


def _relative_to(path: str, base_dir: str | Path | None) -> Path:
    """``path`` as given when absolute or when it exists; else relative to ``base_dir``."""
    given = Path(path).expanduser()
    if given.is_absolute() or base_dir is None or given.exists():
        return given
    return Path(base_dir) / given


def _read_json_or_literal(path: Path, field_name: str) -> Any:
    """A file's JSON, or the seed's Python-literal form (``concepts_list = [...]`` with ``#``
    comments); read with ast.literal_eval, which runs no code."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([FieldError(field_name, f"cannot read {path}: "
                                                  f"{exc.strerror or exc}")]) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([FieldError(field_name, f"{path} is not UTF-8 text")]) from exc
    try:
        data = json.loads(text)
    except RecursionError:  # the decoder recurses once per level of nesting
        raise _too_deep_error(path, field_name) from None
    except json.JSONDecodeError as json_error:
        try:
            data = _python_literal(text, path, field_name)
        except ConfigError as exc:
            if text.lstrip().startswith(("{", "[")) and TOO_DEEP not in str(exc):
                raise ConfigError([FieldError(field_name, f"{path} is not valid JSON (line "
                                              f"{json_error.lineno}: {json_error.msg})")]) from None
            raise
    if _too_deep(data):
        raise _too_deep_error(path, field_name)
    return data


def _too_deep_error(path: Path, field_name: str) -> ConfigError:
    return ConfigError([FieldError(field_name, f"{path} is {TOO_DEEP}")])


def _too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether lists, tuples and dicts in ``value`` nest more than ``limit`` levels. Walked with
    a stack, not recursion: any depth (and a cycle) is safe to ask about."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            if depth >= limit:
                return True
            stack.extend((child, depth + 1)
                         for child in (item.values() if isinstance(item, dict) else item))
    return False


def _python_literal(text: str, path: Path, field_name: str = "concepts_list") -> Any:
    try:
        module = ast.parse(text)
    except (RecursionError, MemoryError):  # the parser's stack: e.g. 1+1+...+1, - - ... -1
        raise _too_deep_error(path, field_name) from None
    except (SyntaxError, ValueError) as exc:
        if "too many nested" in str(exc):  # the parser's limit on brackets
            raise _too_deep_error(path, field_name) from None
        raise ConfigError([FieldError(
            field_name, f"{path} is neither JSON nor a Python list "
                        f"(line {getattr(exc, 'lineno', '?')})")]) from exc
    try:
        for node in module.body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "concepts_list" for t in node.targets):
                return ast.literal_eval(node.value)
            if isinstance(node, ast.Expr):
                return ast.literal_eval(node.value)
    except (RecursionError, MemoryError):
        raise _too_deep_error(path, field_name) from None
    except (ValueError, TypeError, SyntaxError) as exc:
        raise ConfigError([FieldError(field_name, f"{path}: only plain values (lists, dicts, "
                                                  f"text, numbers) can be read ({exc})")]) from exc
    raise ConfigError([FieldError(field_name, f"{path} holds no list of concepts")])


PATH_FIELDS = ("base_model", "vae_path", "clip_l_path", "t5xxl_path", "models_dir",
               "caption_extension")
CONCEPT_PATH_FIELDS = ("instance_data_dir", "class_data_dir", "validation_data_dir")


def control_character_errors(config) -> list[FieldError]:
    """NUL and other control characters: refused in paths; in prompts only NUL and the
    invisible ones (tabs and line breaks in a prompt are just spaces)."""
    from dreambooth.common.names import control_characters

    def bad(text: str, path: bool) -> list[str]:
        found = control_characters(text)
        return found if path else [c for c in found if c not in ("\\x09", "\\x0a", "\\x0d")]

    errors = []
    checks: list[tuple[str, str, bool]] = [(name, getattr(config, name), True) for name in PATH_FIELDS]
    checks += [(name, getattr(config, name), False) for name in ("sample_negative_prompt",)]
    checks += [(f"sample_prompts[{i}]", p, False) for i, p in enumerate(config.sample_prompts)]
    for i, concept in enumerate(config.concepts):
        for f in dataclasses.fields(concept):
            value = getattr(concept, f.name)
            if isinstance(value, str):
                checks.append((f"concepts[{i}].{f.name}", value, f.name in CONCEPT_PATH_FIELDS))
    for name, value, path in checks:
        found = bad(value, path)
        if found:
            errors.append(FieldError(name, f"contains control characters ({', '.join(found)})"))
    return errors
