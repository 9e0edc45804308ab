"""Every file the extension writes goes through here: written whole or not at all.

:func:`atomic_path` hands out a hidden temporary name beside the target (``.<name>.<pid>.tmp``,
a file or a folder), and renames it into place only when the writer finished without an error;
on any failure — an exception, a full disk, a cancel — the temporary is removed and an OS-level
failure becomes one :class:`WriteError` that names the file, the folder and, when the disk is
full, the bytes needed and free. Nobody (the WebUI's checkpoint list, a resumed run) ever sees
half a file, and an existing file is replaced only when the caller says ``overwrite=True``.

A process killed in the middle of a write cannot clean up after itself: its temporaries carry its
process id, and :func:`sweep` (run when a job starts and when the WebUI loads the extension)
removes those of processes that no longer run.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

# Exit codes of every command (python -m dreambooth ...): each means one thing.
EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected error (Python's own code for an uncaught exception)
EXIT_BAD_INPUT = 2  # a config, picture, checkpoint or name that cannot be used (nothing written)
EXIT_WRITE_FAILED = 3  # a file could not be written (full disk, permissions); resume point kept
EXIT_CANCELLED = 4  # stopped early on request (Ctrl+C or cancel); a resume point was written
EXIT_INTERRUPTED = 130  # a second Ctrl+C: stopped at once

TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<kind>tmp|trash)$")
_DISK_FULL_TEXT = ("no space left", "os error 28", "disk full", "not enough space",
                   "quota exceeded", "file write failed")


class WriteError(RuntimeError):
    """A file could not be written (full disk, no permission, read-only folder...).

    ``target`` is the file that was being written, ``needed`` / ``free`` the bytes it needed and
    the bytes free in its folder when known."""

    def __init__(self, target: Path, reason: str, *, needed: int | None = None,
                 free: int | None = None, note: str = ""):
        self.target, self.reason, self.needed, self.free = Path(target), reason, needed, free
        self.note = note
        text = f"cannot write {self.target.name} in {self.target.parent}: {reason}"
        if needed is not None and free is not None:
            text += f" ({human_bytes(needed)} needed, {human_bytes(free)} free)"
        super().__init__(text + (f"; {note}" if note else ""))


class OutputExistsError(ValueError):
    """The target exists and the caller did not allow replacing it (a user's file is kept)."""

    def __init__(self, target: Path, note: str = ""):
        self.target, self.note = Path(target), note
        super().__init__(f"{self.target} already exists; choose another name or turn on overwrite"
                         + (f"; {note}" if note else ""))


def with_note(error: "WriteError | OutputExistsError", note: str) -> "WriteError | OutputExistsError":
    """The same error with a sentence added (what was kept, what to do)."""
    if isinstance(error, WriteError):
        return WriteError(error.target, error.reason, needed=error.needed, free=error.free,
                          note=note)
    return OutputExistsError(error.target, note=note)


def human_bytes(count: int | float) -> str:
    value = float(count)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"  # pragma: no cover - the loop always returns


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk holding ``folder`` (its nearest existing parent); None if unknown."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def temp_path(target: Path, kind: str = "tmp") -> Path:
    """The hidden temporary beside ``target`` that this process writes it through."""
    target = Path(target)
    return target.parent / f".{target.name}.{os.getpid()}.{kind}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            path.unlink()


def _is_write_failure(exc: BaseException) -> bool:
    """OS errors, and the errors safetensors (SafetensorError) and torch.save (RuntimeError
    from its stream writer) raise when the disk refuses the bytes."""
    if isinstance(exc, OSError):
        return True
    text = str(exc).lower()
    if type(exc).__name__ == "SafetensorError":
        return True
    # torch.save on a full disk: "[enforce fail at inline_container.cc] unexpected pos ..."
    return isinstance(exc, RuntimeError) and any(
        t in text for t in ("write", "os error", "inline_container", "pytorchstreamwriter"))


def _reason(exc: BaseException, folder: Path, needed: int | None) -> tuple[str, bool]:
    """A sentence for people, and whether the disk is full."""
    code = getattr(exc, "errno", None)
    text = str(exc).lower()
    free = free_bytes(folder)
    # errors without an errno (safetensors') are judged by the room left; an OS error says itself
    nearly_full = code is None and free is not None and (free < (needed or 0) or free < (1 << 20))
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) or nearly_full \
            or any(t in text for t in _DISK_FULL_TEXT):
        return "the disk is full", True
    if code in (errno.EACCES, errno.EPERM) or "permission denied" in text:
        return "permission denied (the folder is not writable for this user)", False
    if code == errno.EROFS or "read-only" in text:
        return "the folder is on a read-only disk", False
    if code == errno.ENAMETOOLONG:
        return "the file name is too long for this disk", False
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}", False


def write_error(target: Path, exc: BaseException, needed: int | None = None) -> WriteError:
    """The WriteError for ``exc``, raised while writing ``target``."""
    target = Path(target)
    reason, full = _reason(exc, target.parent, needed)
    free = free_bytes(target.parent) if full else None
    return WriteError(target, reason, needed=needed if full else None, free=free)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            if child.is_file():
                _fsync(child)
    _fsync(path)


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) if needed; WriteError when it cannot be."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder / ".", exc) from exc
    return folder


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, overwrite: bool, needed_bytes: int | None = None
                ) -> Iterator[Path]:
    """Yields the temporary path to write ``target`` through (a file, or a folder the caller
    creates); renames it into place when the block ends without an error.

    ``overwrite=False`` keeps an existing target (OutputExistsError, before and after the write).
    ``needed_bytes`` (an estimate) refuses the write at once when the disk has less free.
    On any failure the temporary is removed; OS-level failures become WriteError."""
    target = Path(target)
    folder = target.parent
    try:  # a name too long, a folder that cannot be searched: a write failure, never a traceback
        if target.exists() and not overwrite:
            raise OutputExistsError(target)
        ensure_folder(folder)
        tmp = temp_path(target)
        _remove(tmp)
    except OSError as exc:
        raise write_error(target, exc) from exc
    if needed_bytes is not None:
        free = free_bytes(folder)
        if free is not None and free < needed_bytes:
            raise WriteError(target, "the disk is full", needed=needed_bytes, free=free)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"the writer of {target.name} wrote nothing")
        _fsync_tree(tmp)
        if target.exists():
            if not overwrite:
                raise OutputExistsError(target)
            if target.is_dir() and not target.is_symlink():
                # A folder cannot be renamed over a full one: set the old one aside first.
                trash = temp_path(target, "trash")
                _remove(trash)
                os.replace(target, trash)
                os.replace(tmp, target)
                _remove(trash)
                return
        os.replace(tmp, target)
        _fsync(folder)
    except BaseException as exc:
        # Why it failed is judged before the temporary goes (a full disk frees up after it).
        reason = (_reason(exc, folder, needed_bytes)
                  if _is_write_failure(exc) and not isinstance(exc, WriteError) else None)
        _remove(tmp)
        if reason is None:
            raise
        text, full = reason
        raise WriteError(target, text, needed=needed_bytes if full else None,
                         free=free_bytes(folder) if full else None) from exc


def write_bytes(target: str | os.PathLike, data: bytes, *, overwrite: bool) -> Path:
    target = Path(target)
    with atomic_path(target, overwrite=overwrite, needed_bytes=len(data)) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return target


def write_text(target: str | os.PathLike, text: str, *, overwrite: bool) -> Path:
    return write_bytes(target, text.encode("utf-8"), overwrite=overwrite)


def write_json(target: str | os.PathLike, value: Any, *, overwrite: bool) -> Path:
    return write_text(target, json.dumps(value, indent=2, allow_nan=False) + "\n",
                      overwrite=overwrite)


def remove_tree(folder: str | os.PathLike) -> None:
    """Remove a folder so that an interruption never leaves a half-deleted one under its name:
    it is renamed to a hidden trash name first (which :func:`sweep` finishes if needed)."""
    folder = Path(folder)
    if not folder.exists():
        return
    trash = temp_path(folder, "trash")
    _remove(trash)
    os.replace(folder, trash)
    _remove(trash)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (on this machine)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: running
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Remove the temporaries and trash left in ``folder`` by processes that no longer run, and by
    this process (call it when no write of this process is under way: at a job's start). Returns
    what was removed. Files of other programs are never touched: only names of our pattern."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    entries = folder.rglob(".*") if recursive else folder.glob(".*")
    for path in sorted(entries, key=lambda p: len(p.parts)):
        match = TEMP_PATTERN.match(path.name)
        if not match or not path.exists():
            continue
        pid = int(match.group("pid"))
        if pid == os.getpid() or not pid_alive(pid):
            _remove(path)
            removed.append(path)
    return removed
