"""Exit codes mean one thing (``dreambooth.common.files``): 2 bad input, 3 a file that cannot be written.

Input that used to end in a traceback (exit 1) or in a file that says something else than it holds:
configs nested far too deep for Python's stack, in JSON and in the seed's Python-literal form, in
every command that reads one; ``bench`` options the run would refuse only after its set-up;
``extract-lora`` into a folder that cannot take the file; ``extract-lora --rank`` larger than any
layer. Each command is called in-process, as ``python -m dreambooth`` calls it.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from checkpoint_fixtures import components, make_base, perturb
from dreambooth.app import bench
from dreambooth.common import files
from dreambooth.models import export as ex
from dreambooth.__main__ import main
from dreambooth.models.adapters import extract
from dreambooth.common.config import ConfigError, TrainingConfig, read_concepts_list

DEEP = 100_000  # far past Python's recursion limit (1000)

# name -> the text of a config file nested far too deep (every way the readers recurse)
DEEP_FILES = {
    "lists.json": "[" * DEEP + "]" * DEEP,
    "objects.json": '{"a": ' * (DEEP // 2) + "1" + "}" * (DEEP // 2),
    "unclosed.json": "[" * DEEP,
    "deep-field.json": json.dumps({"base_model": "x"})[:-1] + ', "sample_prompts": '
                       + "[" * 100 + "]" * 100 + "}",  # parses; too deep to be a config
    "sums.py": "concepts_list = " + "1+" * DEEP + "1",  # the Python parser's recursion
    "signs.py": "concepts_list = " + "-" * DEEP + "1",  # the Python parser's stack (MemoryError)
    "brackets.py": "# the seed's form\nconcepts_list = " + "[" * 150 + "]" * 150,
}


def deep_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture(params=sorted(DEEP_FILES))
def deep_file(request, tmp_path) -> Path:
    path = tmp_path / request.param
    path.write_text(DEEP_FILES[request.param])
    return path


def one_clear_error(capsys, *words: str) -> str:
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text and "RecursionError" not in text, text
    for word in words:
        assert word in text, text
    return text


@pytest.mark.parametrize("command", [["train"], ["check", "--no-tokenizer"],
                                     ["caption", "--config"], ["ui", "--config"]])
def test_a_config_nested_too_deep_is_bad_input_in_every_command(command, deep_file, capsys):
    assert main(command + [str(deep_file)]) == files.EXIT_BAD_INPUT
    one_clear_error(capsys, deep_file.name, "nested too deeply to be a training config")


def test_the_tabs_concepts_import_and_a_concepts_list_file_say_so_too(deep_file, tmp_path):
    with pytest.raises(ConfigError, match=f"{deep_file.name} is nested too deeply"):
        read_concepts_list(deep_file)
    config = tmp_path / "uses-it.json"
    config.write_text(json.dumps({"base_model": "x", "concepts_list": str(deep_file)}))
    with pytest.raises(ConfigError, match="nested too deeply") as caught:
        TrainingConfig.load(config)
    assert [e.field for e in caught.value.errors] == ["concepts_list"]


@pytest.mark.parametrize("field", ["base_model", "sample_prompts", "learning_rate", "concepts"])
def test_deep_values_in_memory_are_named_by_field(field):
    """What the API and the tab hand to parse (no file): the field, and no repr of the value."""
    config, errors = TrainingConfig.parse({"model_name": "kept", field: deep_list(DEEP)})
    assert [(e.field, e.message) for e in errors] == [(field, "nested too deeply to be a "
                                                               "training config")]
    assert config.model_name == "kept"
    with pytest.raises(ConfigError, match="concepts: nested too deeply"):
        TrainingConfig.from_dict(deep_list(DEEP))  # the bare-list (concepts_list) form


# --- bench ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--rank", "0"], "--rank"), (["--rank", "-1"], "--rank"), (["--rank", "5000"], "--rank"),
    (["--resolution", "0"], "--resolution"), (["--resolution", "7"], "--resolution"),
    (["--resolution", "-64"], "--resolution"), (["--resolution", "60"], "multiple of 8"),
    (["--matrix", "no-such-matrix"], "--matrix: 'no-such-matrix' is neither"),
])
def test_bench_refuses_bad_options_as_usage_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["bench", "--quiet", *argv])
    assert caught.value.code == files.EXIT_BAD_INPUT
    assert words in one_clear_error(capsys)


@pytest.mark.parametrize("content, words", [
    ("[" * DEEP, "nested too deeply"), ("{nope", "not a readable JSON file"),
    ('{"runs": 5}', "holds no list of runs"), ("[]", "holds no list of runs"),
    ('[{"name": "a", "options": 3}]', "entry 0 is not an object"),
    ('[{"name": "a", "rank": 0}]', "line 'a'): error: --rank"),
    ('[{"name": "a", "optimizer": "adamx"}]', "line 'a'): error: argument --optimizer"),
])
def test_bench_refuses_a_bad_matrix_file_before_any_line_runs(content, words, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setattr(bench, "run_child", lambda *a: pytest.fail("a line ran"))
    matrix = tmp_path / "m.json"
    matrix.write_text(content)
    with pytest.raises(SystemExit) as caught:
        main(["bench", "--quiet", "--matrix", str(matrix)])
    assert caught.value.code == files.EXIT_BAD_INPUT
    assert words in one_clear_error(capsys)


def test_bench_json_that_cannot_be_written_is_a_write_failure(tmp_path, capsys, monkeypatch):
    def failed_run(args):  # the run itself is not what this is about
        figures = dict(bench.empty_figures(), error="not run")
        return {"name": "run", "options": bench.run_options(args), "figures": figures,
                "environment": bench.environment(False, 0), "command": ""}

    monkeypatch.setattr(bench, "single", failed_run)
    (tmp_path / "file.txt").write_text("a file, not a folder")
    out = tmp_path / "file.txt" / "figures.json"
    assert main(["bench", "--quiet", "--json", str(out)]) == files.EXIT_WRITE_FAILED
    one_clear_error(capsys, "error: cannot write")


def test_a_matrix_line_is_parsed_as_its_command_line():
    base = bench.run_options(bench.build_parser().parse_args([]))
    assert bench.checked_line("x", dict(base, rank="8"))["rank"] == 8


# --- extract-lora -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(trained, base): the tiny model with every weight changed (full rank everywhere)."""
    folder = tmp_path_factory.mktemp("exit-codes")
    base = make_base(folder, "sd1")
    trained = components("sd1")
    perturb(trained.unet, seed=1)
    perturb(trained.text_encoder, seed=2)
    return ex.save_single_file(trained, folder / "trained.safetensors", kind="sd1"), base


def extract_to(models, out: Path, *options: str) -> int:
    trained, base = models
    return main(["extract-lora", str(trained), str(base), str(out), "--rank", "4", *options])


def test_extract_lora_through_a_file_is_a_write_failure_before_any_work(models, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    assert extract_to(models, tmp_path / "file.txt" / "sub" / "out.safetensors") == \
        files.EXIT_WRITE_FAILED
    text = one_clear_error(capsys, "cannot write out.safetensors", "file.txt is a file")
    assert "loading" not in text  # refused before the models were read


def test_extract_lora_with_a_name_too_long_is_a_write_failure(models, tmp_path, capsys):
    assert extract_to(models, tmp_path / ("x" * 300 + ".safetensors")) == files.EXIT_WRITE_FAILED
    one_clear_error(capsys, "file name is too long")


def read_only(monkeypatch, folder: Path) -> None:
    """``folder`` behaves as on a read-only disk (EROFS: even removing a missing file fails,
    as Linux does); chmod would not do: these tests run as root, who writes anyway."""
    real_open, real_unlink = os.open, os.unlink

    def refuse(path, real, *args, **kwargs):
        if Path(path).parent == folder:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", lambda path, *a, **k: refuse(path, real_open, *a, **k))
    monkeypatch.setattr(os, "unlink", lambda path, *a, **k: refuse(path, real_unlink, *a, **k))


def test_extract_lora_into_a_read_only_folder_is_a_write_failure(models, tmp_path, capsys,
                                                                   monkeypatch):
    read_only(monkeypatch, tmp_path)
    assert extract_to(models, tmp_path / "out.safetensors") == files.EXIT_WRITE_FAILED
    text = one_clear_error(capsys, "cannot write out.safetensors", "read-only disk")
    assert "loading" not in text and str(tmp_path) in text


def test_a_disk_that_turns_read_only_during_the_extraction_is_a_write_failure(
        models, tmp_path, capsys, monkeypatch):
    real = extract.extract_lora

    def then_read_only(*args, **kwargs):
        result = real(*args, **kwargs)
        read_only(monkeypatch, tmp_path)
        return result

    monkeypatch.setattr(extract, "extract_lora", then_read_only)
    assert extract_to(models, tmp_path / "out.safetensors") == files.EXIT_WRITE_FAILED
    one_clear_error(capsys, "cannot write out.safetensors", "read-only disk")
    assert list(tmp_path.iterdir()) == []


def test_a_rank_larger_than_every_layer_is_written_as_the_rank_stored(models, tmp_path, capsys):
    out = tmp_path / "big.safetensors"
    trained, base = models
    assert main(["extract-lora", str(trained), str(base), str(out), "--rank", "100000",
                 "--conv-rank", "100000"]) == files.EXIT_OK
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    downs = {key[:-len(".lora_down.weight")]: t for key, t in tensors.items()
             if key.endswith(".lora_down.weight")}
    is_3x3 = {name: t.dim() == 4 and tuple(t.shape[2:]) != (1, 1) for name, t in downs.items()}
    dim = max(t.shape[0] for name, t in downs.items() if not is_3x3[name])
    conv_dim = max(t.shape[0] for name, t in downs.items() if is_3x3[name])
    assert dim < 100_000 and conv_dim < 100_000
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == str(dim)
    args = json.loads(meta["ss_network_args"])
    assert args["conv_dim"] == args["conv_alpha"] == conv_dim
    for name, down in downs.items():  # each layer applies at scale alpha / its rank = 1
        assert float(tensors[f"{name}.alpha"]) == down.shape[0]
        assert tensors[f"{name}.lora_up.weight"].shape[1] == down.shape[0]
    printed = capsys.readouterr().out
    assert f"rank 100000 is more than any layer holds: capped to {dim}" in printed
    assert f"conv rank 100000 is more than any 3x3 convolution holds: capped to {conv_dim}" \
        in printed
    assert f"rank {dim}, conv rank {conv_dim}" in printed.splitlines()[-1]


def test_a_rank_that_fits_is_written_as_asked(models, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    assert extract_to(models, out) == files.EXIT_OK
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["ss_network_dim"] == "4"
    assert "capped" not in capsys.readouterr().out
