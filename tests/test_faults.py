"""Faults a user meets: a training process killed at any moment (during exports and resume-point
writes too), a full disk, a refused config, hostile names on the command line. Each asserts what
the user sees: the exit code, one clear message, and the folders afterwards — nothing lost,
nothing half-written visible, nothing left behind once the next run has started."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors import safe_open

from dreambooth.common import files
from dreambooth.engine import resume
from dreambooth.__main__ import main as cli_main

from test_cli import env, write_config

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "fault_child.py"


def folders(tmp_path: Path, name: str = "cli-model") -> tuple[Path, Path]:
    models = tmp_path / "models"
    return models / "Stable-diffusion", models / "dreambooth" / name


def visible_models(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if not p.name.startswith(".") and p.name != "base.safetensors")


def hidden(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*")) if folder.is_dir() else []


def assert_consistent(tmp_path: Path) -> None:
    """What a killed run may leave: complete files and complete resume points only (hidden
    temporaries aside, which the next start sweeps)."""
    out, work = folders(tmp_path)
    for model in visible_models(out):
        with safe_open(str(model), framework="pt") as handle:  # fully readable, ours
            assert handle.metadata()["dreambooth.run_id"]
            for key in handle.keys():
                handle.get_tensor(key)
    for point in resume.list_resume_points(work / "checkpoints"):
        state = resume.read_state(point)
        assert (point / "unet.safetensors").is_file() and state["run_id"], point
    if (work / "config.json").exists():
        json.loads((work / "config.json").read_text())


def start_child(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), "train", str(config), "--quiet", *extra],
                            cwd=config.parent, env={**env(), "FAULT_WRITE_DELAY": "1.5"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_at_write(child: subprocess.Popen, write: int | None, delay: float = 0.0) -> str:
    """SIGKILL the child while its ``write``-th safetensors write is not yet renamed (or, with
    ``write`` None, ``delay`` seconds after it started); returns what it was writing."""
    if write is None:
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(60)
        return "at a random moment"
    deadline = time.time() + 240
    for line in child.stderr:
        if line.startswith(f"SLOW-WRITE {write} "):
            child.send_signal(signal.SIGKILL)
            child.wait(60)
            return line.split(" ", 2)[2].strip()
        if time.time() > deadline:
            break
    child.kill()
    raise AssertionError(f"the child never reached write {write} (exit {child.wait()})")


def test_a_run_killed_at_any_moment_loses_nothing_and_resumes(tmp_path):
    config = write_config(tmp_path, max_train_steps=6, checkpoint_every_n_steps=2,
                          save_every_n_steps=3, with_prior_preservation=False,
                          checkpoints_total_limit=0)
    out, work = folders(tmp_path)
    rng = random.Random(10)
    # 1: inside the first resume point; 2: (fresh again) inside the step-3 intermediate save;
    # 3: (resumed at 2) inside the final export; 4: at a random moment of a resumed run
    plan = [(1, ()), (3, ("--resume",)), (4, ("--resume",)), (None, ("--resume",))]
    seen, left = [], []
    for write, extra in plan:
        child = start_child(config, *extra)
        seen.append(kill_at_write(child, write, delay=rng.uniform(1.0, 4.0)))
        assert child.returncode == -signal.SIGKILL
        assert_consistent(tmp_path)
        left += hidden(out) + hidden(work)
    assert "step-000002" in seen[0] and "cli-model_3" in seen[1] and "cli-model.safetensors" in seen[2]
    assert any(".tmp" in p.name for p in left)  # the kills did leave temporaries behind
    finish = subprocess.run([sys.executable, "-m", "dreambooth", "train", str(config), "--resume",
                             "--quiet"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                            timeout=300)
    assert finish.returncode == files.EXIT_OK, finish.stderr[-3000:]
    assert "trained 6/6 steps" in finish.stdout
    assert [p.name for p in visible_models(out)] == ["cli-model.safetensors", "cli-model_3.safetensors"]
    assert hidden(out) == [] and hidden(work) == []  # swept at the start of the last run
    assert_consistent(tmp_path)


def test_kill_9_after_the_first_save_and_before_the_first_resume_point_resumes(tmp_path):
    """The run's own intermediate save (its run id in the file, the run's id in run.json) does
    not block its --resume."""
    config = write_config(tmp_path, max_train_steps=4, checkpoint_every_n_steps=3,
                          save_every_n_steps=1, with_prior_preservation=False)
    out, work = folders(tmp_path)
    child = start_child(config)
    assert "cli-model_2" in kill_at_write(child, 2)  # the step-2 save, after the step-1 save
    assert [p.name for p in visible_models(out)] == ["cli-model_1.safetensors"]
    assert resume.list_resume_points(work / "checkpoints") == []
    finish = subprocess.run([sys.executable, "-m", "dreambooth", "train", str(config), "--resume",
                             "--quiet"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                            timeout=300)
    assert finish.returncode == files.EXIT_OK, finish.stderr[-3000:]
    assert "cli-model.safetensors" in [p.name for p in visible_models(out)]
    assert_consistent(tmp_path)


@contextmanager
def small_disk(path: Path, size: str):
    """A real small file system where the machine lets us mount one (root), else None."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_at_export_keeps_the_training_and_resumes(tmp_path, monkeypatch, capsys):
    """The checkpoints folder is on a 1 MB disk (the tiny model needs 3.4 MB): the export
    fails with a message naming the folder and the bytes, the resume point keeps the weights,
    and after space is made the resumed run only exports."""
    disk = tmp_path / "small"
    with small_disk(disk, "1m") as mounted:
        config_path = write_config(tmp_path, max_train_steps=3)
        config = json.loads(config_path.read_text())
        base = Path(config["base_model"])
        if not mounted:  # injected ENOSPC where mounting is not allowed: the same outcome
            from dreambooth.models import export

            real = export.write_tensors

            def full(tmp, fmt, layout, tensors, metadata):
                if Path(tmp).parent == disk:
                    tmp.write_bytes(b"x" * 1000)
                    raise OSError(28, "No space left on device")
                return real(tmp, fmt, layout, tensors, metadata)

            monkeypatch.setattr(export, "write_tensors", full)
            monkeypatch.setattr(files, "free_bytes", lambda folder: 1 << 20
                                if Path(folder) == disk else 1 << 40)
        import dreambooth.host as webui

        monkeypatch.setattr(webui.StandaloneHost, "output_dir", lambda self: disk)
        monkeypatch.setattr(webui.StandaloneHost, "checkpoints_dir", lambda self: disk)
        config["base_model"] = str(base)
        config_path.write_text(json.dumps(config))
        # the preflight estimate would refuse at once; a disk that fills during training is the case
        from dreambooth.app import preflight

        monkeypatch.setattr(preflight, "_output_errors", lambda *a, **k: [])
        code = cli_main(["train", str(config_path), "--quiet"])
        err = capsys.readouterr().err
        assert code == files.EXIT_WRITE_FAILED, err
        assert f"cannot write cli-model.safetensors in {disk}: the disk is full" in err
        assert "needed" in err and "free)" in err and "kept as the resume point" in err
        assert "Traceback" not in err
        assert sorted(p.name for p in disk.iterdir()) == []  # no temporary left on the full disk
        _, work = folders(tmp_path)
        assert [p.name for p in resume.list_resume_points(work / "checkpoints")] == ["step-000003"]
        monkeypatch.undo()  # space made: the next run writes elsewhere
        code = cli_main(["train", str(config_path), "--resume"])
        output = capsys.readouterr()
        assert code == files.EXIT_OK, output.err
        assert "trained 3/3 steps" in output.out and "resumed from step-000003" in output.err + output.out


def test_a_real_full_disk_mid_write_leaves_nothing(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    disk = tmp_path / "tiny-disk"
    with small_disk(disk, "64k") as mounted:
        if not mounted:  # the same failure, injected
            def full(tensors, filename, metadata=None):
                Path(filename).write_bytes(b"x" * 4096)
                raise OSError(28, "No space left on device")

            save_file = full  # noqa: F811
        with pytest.raises(files.WriteError, match="model.safetensors in .*: the disk is full"):
            with files.atomic_path(disk / "model.safetensors", overwrite=False) as tmp:
                save_file({"w": torch.zeros(100_000)}, str(tmp))
        assert list(disk.iterdir()) == []


def test_a_full_disk_before_training_is_refused_at_once(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path)
    monkeypatch.setattr(files, "free_bytes", lambda folder: 1000)
    assert cli_main(["train", str(config), "--quiet"]) == files.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "model_name:" in err and "has 1000 bytes free; the trained model needs about" in err
    assert not (tmp_path / "models" / "dreambooth").exists()


@pytest.mark.parametrize("name, file_name", [("con", "_con"), ("a:b", "a_b"), ("  spaced  ", "spaced")])
def test_the_command_line_names_outputs_as_the_tab_does(tmp_path, name, file_name, capsys):
    config = write_config(tmp_path, model_name=name, max_train_steps=1)
    assert cli_main(["train", str(config), "--quiet"]) == files.EXIT_OK, capsys.readouterr().err
    out, work = folders(tmp_path, file_name)
    assert (out / f"{file_name}.safetensors").is_file() and (work / "config.json").is_file()
    assert sorted(p.name for p in work.parent.iterdir()) == [file_name]


@pytest.mark.parametrize("name", ["bad\x00name", "a/../../b", ".."])
def test_a_bad_name_is_refused_before_any_work(tmp_path, name, capsys):
    config = write_config(tmp_path, model_name=name)
    started = time.time()
    assert cli_main(["train", str(config), "--quiet"]) == files.EXIT_BAD_INPUT
    assert "model_name" in capsys.readouterr().err and time.time() - started < 30
    assert not (tmp_path / "models" / "dreambooth").exists()
    assert visible_models(tmp_path / "models" / "Stable-diffusion") == []


def test_a_refused_config_writes_nothing_and_keeps_an_earlier_run(tmp_path, capsys):
    config = write_config(tmp_path, max_train_steps=1)
    assert cli_main(["train", str(config), "--quiet"]) == files.EXIT_OK
    _, work = folders(tmp_path)
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    # the same name again, now with a missing picture folder: refused, the earlier run untouched
    data = json.loads(config.read_text())
    data["concepts"][0]["instance_data_dir"] = str(tmp_path / "nowhere")
    data["overwrite"] = True
    config.write_text(json.dumps(data))
    assert cli_main(["train", str(config), "--quiet"]) == files.EXIT_BAD_INPUT
    assert "instance_data_dir" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before


def test_a_refused_job_in_the_tab_writes_nothing(tmp_path):
    from dreambooth.common.config import TrainingConfig
    from dreambooth.app.job import JobRunner
    from dreambooth.engine.trainer import RunPaths

    config = json.loads(write_config(tmp_path).read_text())
    config["concepts"][0]["instance_data_dir"] = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    runner = JobRunner()
    paths = RunPaths(work_dir=tmp_path / "work", checkpoints_dir=tmp_path / "out")
    runner.start(TrainingConfig.from_dict(config), paths)
    snap = runner.wait(120)
    assert snap.phase == "failed" and "holds no pictures" in snap.error
    assert not any("Traceback" in line for line in snap.log)  # one clear message, no traceback
    assert not paths.work_dir.exists() and not paths.checkpoints_dir.exists()


def test_an_intermediate_save_never_replaces_a_users_file(tmp_path, capsys):
    config = write_config(tmp_path, max_train_steps=3, save_every_n_steps=2)
    out, _ = folders(tmp_path)
    users = out / "cli-model_2.safetensors"
    users.write_bytes(b"the user's own model")
    assert cli_main(["train", str(config), "--quiet"]) == files.EXIT_BAD_INPUT
    assert "cli-model_2.safetensors already exists" in capsys.readouterr().err
    assert users.read_bytes() == b"the user's own model"
    data = json.loads(config.read_text())
    data["overwrite"] = True  # said so: replaced
    config.write_text(json.dumps(data))
    assert cli_main(["train", str(config), "--quiet"]) == files.EXIT_OK
    assert users.read_bytes() != b"the user's own model"


def test_a_diffusers_folder_as_base_trains_and_exports_a_standard_single_file(tmp_path, capsys):
    from dreambooth.models import checkpoint, tiny

    folder = tiny.save_diffusers_folder(tiny.build_components("tiny", seed=0), tmp_path / "base-diffusers")
    config = write_config(tmp_path, base_model=str(folder), max_train_steps=2)
    assert cli_main(["train", str(config), "--quiet"]) == files.EXIT_OK, capsys.readouterr().err
    out, _ = folders(tmp_path)
    written = out / "cli-model.safetensors"
    assert checkpoint.detect_kind(written).kind == "sd1"
    with safe_open(str(written), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata()["dreambooth.base_model"] == "base-diffusers"
    assert {"betas", "alphas_cumprod", "posterior_mean_coef2"} <= keys
    components, _ = checkpoint.load_components(written)  # it loads back through diffusers


def test_cancel_exits_with_its_own_code(tmp_path):
    config = write_config(tmp_path, max_train_steps=2000)
    child = subprocess.Popen([sys.executable, "-m", "dreambooth", "train", str(config)],
                             cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    for line in child.stdout:
        if "[training]" in line:
            break
    time.sleep(1.0)
    child.send_signal(signal.SIGINT)  # one Ctrl+C: stop after this step, resume point written
    rest = child.communicate(timeout=240)[0]
    assert child.returncode == files.EXIT_CANCELLED, rest[-2000:]
    _, work = folders(tmp_path)
    assert resume.list_resume_points(work / "checkpoints")
