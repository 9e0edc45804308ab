"""The one atomic-write helper: whole files or nothing, clear errors, no leftovers, the sweep."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from dreambooth.common import files
from dreambooth.common.files import OutputExistsError, WriteError


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "out" / "model.safetensors"
    with files.atomic_path(target, overwrite=False) as tmp:
        tmp.write_bytes(b"half")
        assert not target.exists() and tmp.name.startswith(".model.safetensors.")
    assert target.read_bytes() == b"half" and listing(target.parent) == ["model.safetensors"]


@pytest.mark.parametrize("failure", [RuntimeError("the writer broke"), KeyboardInterrupt()])
def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, failure):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the user's model")
    with pytest.raises(type(failure)):
        with files.atomic_path(target, overwrite=True) as tmp:
            tmp.write_bytes(b"new but incomplete")
            raise failure
    assert listing(tmp_path) == ["model.safetensors"]
    assert target.read_bytes() == b"the user's model"


def test_an_existing_file_is_kept_without_overwrite(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        files.write_bytes(target, b"other", overwrite=False)
    assert target.read_bytes() == b"mine" and listing(tmp_path) == ["model.safetensors"]
    files.write_bytes(target, b"other", overwrite=True)
    assert target.read_bytes() == b"other"


def test_a_file_appearing_during_the_write_is_kept(tmp_path):
    target = tmp_path / "model.safetensors"
    with pytest.raises(OutputExistsError):
        with files.atomic_path(target, overwrite=False) as tmp:
            tmp.write_bytes(b"ours")
            target.write_bytes(b"someone else's")
    assert target.read_bytes() == b"someone else's" and listing(tmp_path) == ["model.safetensors"]


def test_folders_are_written_and_replaced_whole(tmp_path):
    target = tmp_path / "step-000010"
    for content in (b"first", b"second"):
        with files.atomic_path(target, overwrite=True) as tmp:
            tmp.mkdir()
            (tmp / "a.bin").write_bytes(content)
    assert (target / "a.bin").read_bytes() == b"second" and listing(tmp_path) == ["step-000010"]


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied"),
    (errno.EROFS, "read-only disk")])
def test_os_errors_become_one_clear_write_error(tmp_path, code, words):
    target = tmp_path / "model.safetensors"
    with pytest.raises(WriteError) as info:
        with files.atomic_path(target, overwrite=False) as tmp:
            tmp.write_bytes(b"x" * 100)
            raise OSError(code, os.strerror(code))
    message = str(info.value)
    assert words in message and "model.safetensors" in message and str(tmp_path) in message
    assert listing(tmp_path) == []


def test_safetensors_own_disk_full_error_is_recognised(tmp_path):
    from safetensors import SafetensorError

    failure = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')
    with pytest.raises(WriteError, match="the disk is full"):
        with files.atomic_path(tmp_path / "m.safetensors", overwrite=False, needed_bytes=10):
            raise failure
    assert listing(tmp_path) == []


def test_too_little_space_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_bytes", lambda folder: 1000)
    with pytest.raises(WriteError) as info:
        files.write_bytes(tmp_path / "big.bin", b"x" * 5000, overwrite=False)
    assert "the disk is full (4.9 KB needed, 1000 bytes free)" in str(info.value)
    assert listing(tmp_path) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with files.atomic_path(tmp_path / "x", overwrite=False) as tmp:
            tmp.write_bytes(b"1")
            1 / 0
    assert listing(tmp_path) == []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_sweep_removes_leftovers_of_dead_processes_only(tmp_path):
    dead = dead_pid()
    alive = os.getppid()  # the process that started pytest runs on
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / f".model.safetensors.{dead}.tmp", tmp_path / "sub" / f".x.png.{dead}.tmp",
             tmp_path / f".step-000010.{dead}.trash"]
    for path in stale[:2]:
        path.write_bytes(b"partial")
    stale[2].mkdir()
    kept = [tmp_path / f".other.safetensors.{alive}.tmp", tmp_path / ".hidden-user-file",
            tmp_path / "model.safetensors", tmp_path / ".notes.tmp"]
    for path in kept:
        path.write_bytes(b"keep")
    assert sorted(files.sweep(tmp_path)) == sorted(p for p in stale if p.parent == tmp_path)
    assert (tmp_path / "sub" / f".x.png.{dead}.tmp").exists()  # not recursive
    files.sweep(tmp_path, recursive=True)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


def test_the_sweep_takes_this_process_own_leftovers(tmp_path):
    mine = files.temp_path(tmp_path / "model.safetensors")
    mine.write_bytes(b"from a failed job in this process")
    assert files.sweep(tmp_path) == [mine] and not mine.exists()


def test_remove_tree_never_leaves_a_half_deleted_folder(tmp_path, monkeypatch):
    folder = tmp_path / "step-000010"
    folder.mkdir()
    (folder / "unet.safetensors").write_bytes(b"x")
    monkeypatch.setattr(files, "_remove", lambda path: None)  # as if killed before deleting
    files.remove_tree(folder)
    assert not folder.exists() and listing(tmp_path) == [f".step-000010.{os.getpid()}.trash"]
    monkeypatch.undo()
    files.sweep(tmp_path)
    assert listing(tmp_path) == []


def test_exit_codes_are_distinct():
    codes = [files.EXIT_OK, files.EXIT_ERROR, files.EXIT_BAD_INPUT, files.EXIT_WRITE_FAILED,
             files.EXIT_CANCELLED, files.EXIT_INTERRUPTED]
    assert len(set(codes)) == len(codes)
