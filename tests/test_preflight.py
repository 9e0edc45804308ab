"""Pre-flight before any write: an unusable base model, a full or unwritable output folder are
refused by field before the run folder, its config.json or any deletion happens — with and
without overwrite, the models folder is byte for byte as before."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dreambooth.__main__ import main as cli_main

from test_cli import write_config


class Payload:
    def __reduce__(self):  # what a planted checkpoint asks for: code at load time
        return (print, ("ran code",))


def bad_bases(folder):
    """Files a user might pick as the base model, none of them trainable."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    made["lora"] = folder / "a-lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(8, 4)},
              str(made["lora"]))
    made["random"] = folder / "random.safetensors"
    save_file({"weights": torch.randn(16, 16), "bias": torch.randn(16)}, str(made["random"]))
    good = (folder.parent / "models" / "Stable-diffusion" / "base.safetensors").read_bytes()
    made["truncated"] = folder / "truncated.safetensors"
    made["truncated"].write_bytes(good[: len(good) // 2])
    made["pickle"] = folder / "planted.ckpt"
    made["pickle"].write_bytes(pickle.dumps({"state_dict": Payload()}))
    made["empty"] = folder / "empty.safetensors"
    made["empty"].write_bytes(b"")
    made["absurd header"] = folder / "absurd.safetensors"
    made["absurd header"].write_bytes((2 ** 60).to_bytes(8, "little") + b"{}")
    made["not json"] = folder / "text.safetensors"
    made["not json"].write_bytes((6).to_bytes(8, "little") + b"hello!" + b"\0" * 64)
    return made


def tree(folder):
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_an_unusable_base_model_touches_nothing_with_or_without_overwrite(tmp_path, capsys):
    config = write_config(tmp_path, with_prior_preservation=False, max_train_steps=3,
                          checkpoint_every_n_steps=2)
    assert cli_main(["train", str(config), "--quiet"]) == 0  # an earlier run under the name
    settings = json.loads(config.read_text())
    models = tmp_path / "models"
    bases = bad_bases(tmp_path / "elsewhere")
    before = tree(models)
    assert any("checkpoints" in str(p) for p in before)  # its resume point is there to lose
    for what, base in bases.items():
        for overwrite in (False, True):
            config.write_text(json.dumps({**settings, "base_model": str(base),
                                          "overwrite": overwrite}))
            capsys.readouterr()
            assert cli_main(["train", str(config), "--quiet"]) == 2, what
            said = capsys.readouterr().err
            assert "base_model:" in said and "Traceback" not in said, (what, said)
            assert "ran code" not in said
            assert tree(models) == before, (what, overwrite)


def test_a_full_lora_folder_is_refused_before_training(tmp_path, monkeypatch, capsys):
    from dreambooth.common import files

    config = write_config(tmp_path, with_prior_preservation=False, training_method="lora")
    monkeypatch.setattr(files, "free_bytes", lambda folder: 1000)
    assert cli_main(["train", str(config), "--quiet"]) == 2
    said = capsys.readouterr().err
    assert "model_name:" in said and "Lora" in said and "free" in said
    assert not (tmp_path / "models" / "dreambooth").exists()


def test_an_output_folder_that_cannot_be_made_is_refused_by_field(tmp_path, capsys):
    config = write_config(tmp_path, with_prior_preservation=False, training_method="lora")
    (tmp_path / "models" / "Lora").write_text("a file where the Lora folder should be")
    assert cli_main(["train", str(config), "--quiet"]) == 2
    said = capsys.readouterr().err
    assert "model_name:" in said and "is a file" in said
    assert not (tmp_path / "models" / "dreambooth").exists()


@pytest.mark.parametrize("claimed", [2 ** 60, 2 ** 33, 200 * 2 ** 20])
def test_an_absurd_header_is_never_allocated(tmp_path, claimed):
    from dreambooth.models.checkpoint import export_size_estimate
    from dreambooth.models.detect import CheckpointError, read_safetensors_header

    path = tmp_path / "absurd.safetensors"
    path.write_bytes(claimed.to_bytes(8, "little") + b"{}" * 10)
    with pytest.raises(CheckpointError, match="header claims"):
        read_safetensors_header(path)
    assert export_size_estimate(path, "fp16") is None


def test_a_missing_base_model_says_what_to_do_on_the_command_line(tmp_path, capsys):
    config = write_config(tmp_path, with_prior_preservation=False)
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "base_model": "no-such-model.safetensors"}))
    assert cli_main(["train", str(config), "--quiet"]) == 2
    said = capsys.readouterr().err
    assert "base_model:" in said and "on the command line, give the file's path" in said
    assert not (tmp_path / "models" / "dreambooth").exists()


def test_without_bitsandbytes_the_8bit_options_are_refused_by_field_before_anything(
        tmp_path, capsys, monkeypatch):
    """Forge Neo installs bitsandbytes only when started with --bnb (and we leave it to Neo):
    there the 8-bit optimizer and the int8 and NF4 bases are refused by field, saying so, before
    the first write."""
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as an environment without it
    config = write_config(tmp_path, with_prior_preservation=False)
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "optimizer": "adamw8bit", "training_method": "lora",
                                  "base_weights_8bit": True}))
    assert cli_main(["train", str(config), "--quiet"]) == 2
    said = capsys.readouterr().err
    for field in ("optimizer:", "base_weights_8bit:"):
        line = next(ln for ln in said.splitlines() if field in ln)
        assert "bitsandbytes is not installed" in line and "--bnb" in line
    config.write_text(json.dumps({**settings, "training_method": "lora",
                                  "base_weights_4bit": True}))  # NF4: bitsandbytes' too
    assert cli_main(["train", str(config), "--quiet"]) == 2
    line = next(ln for ln in capsys.readouterr().err.splitlines() if "base_weights_4bit:" in ln)
    assert "bitsandbytes is not installed" in line and "--bnb" in line
    assert not (tmp_path / "models" / "dreambooth").exists()
