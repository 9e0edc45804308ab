"""The benchmark: a tiny real run of 2 measured steps, and a JSON whose shape a script can rely on.

No timing is asserted: the machines are shared and a step can take 10-20x longer when another
process is busy. What is checked is that every figure is there, of the right kind, whether the
run succeeds or fails, and that the matrix runs each line as its own command.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dreambooth.app import bench, bench_run
from dreambooth.models import tiny

# Short but complete: class pictures generated (1 denoising step), export on, so every phase runs.
FAST = ["--size", "tiny", "--resolution", "64", "--steps", "2", "--warmup", "1",
        "--class-pictures", "1", "--sample-steps", "1", "--threads", "2", "--quiet"]


def shape(value):
    """The key structure of a JSON value (what a comparing script depends on); a leaf may be
    null where a figure was not measured."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    return "leaf"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "run.json"
    assert bench.bench_main(FAST + ["--name", "tiny", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_tiny_run_reports_every_figure(tiny_run):
    assert tiny_run["schema"] == bench.SCHEMA == 1
    [run] = tiny_run["runs"]
    assert set(run) >= {"name", "options", "figures", "environment"}
    assert run["name"] == "tiny"
    f = run["figures"]
    assert f["ok"] is True and f["error"] is None
    assert set(f) == set(bench.FIGURE_KEYS)
    assert f["measured_steps"] == 2 and f["warmup_steps"] == 1
    assert f["pictures_per_step"] == 2  # one instance + one class picture (prior preservation)
    for key in ("steps_per_s", "pictures_per_s", "step_s"):
        s = f[key]
        assert s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["max"]
    assert f["pictures_per_s"]["median"] == pytest.approx(2 * f["steps_per_s"]["median"], rel=1e-3)
    assert set(f["phases_s"]) == set(bench.PHASES)
    # Every phase ran: build, base file, load, class pictures, caching, steps, sample, export.
    for phase, seconds in f["phases_s"].items():
        assert seconds is not None and seconds >= 0, phase
    assert f["phases_s"]["training"] <= f["phases_s"]["total"]
    assert f["export_bytes"] > 0
    assert f["memory_mb"]["peak_rss"] > 0 and f["memory_mb"]["training_peak_rss"] > 0
    assert {"loading", "caching", "training", "saving"} <= set(f["memory_mb"]["by_phase"])
    assert f["memory_mb"]["peak_allocated"] is None  # CPU: no GPU figures, but the keys are there
    assert f["dtype"] == "fp32" and f["device"] == "cpu"
    assert isinstance(f["final_loss"], float)


def test_environment_records_versions_and_machine_load(tiny_run):
    env = tiny_run["runs"][0]["environment"]
    assert env["versions"]["torch"] and env["versions"]["diffusers"]
    assert {"transformers", "accelerate", "bitsandbytes"} <= set(env["versions"])
    assert env["device"] == "cpu" and env["device_name"]
    assert env["torch_threads"] == 2
    load = env["load"]
    assert set(load) == {"loadavg_start", "loadavg_end", "other_cpu_percent_median",
                         "other_cpu_percent_max", "samples"}
    assert len(load["loadavg_start"]) == 3


def test_options_reproduce_the_run(tiny_run):
    """The recorded options and command give back the same options when parsed again."""
    run = tiny_run["runs"][0]
    assert set(run["options"]) == set(bench.OPTION_KEYS)
    argv = bench.options_to_argv(run["options"])
    assert bench.run_options(bench.build_parser().parse_args(argv)) == run["options"]
    assert run["command"].startswith("python -m dreambooth bench --size tiny")


def test_a_failed_run_has_the_same_shape(tiny_run, tmp_path):
    """A script comparing two files can rely on the keys even when a line failed."""
    out = tmp_path / "bad.json"
    # bf16 weights without bf16 compute: the config check fails inside the real engine (a bad
    # --resolution is refused by the command line itself, exit 2, before any run)
    code = bench.bench_main(FAST + ["--trained-precision", "bf16", "--no-export", "--json",
                                    str(out)])
    assert code == 1
    bad = json.loads(out.read_text())["runs"][0]
    assert bad["figures"]["ok"] is False and "trained_precision" in bad["figures"]["error"]
    good = tiny_run["runs"][0]
    assert set(bad) == set(good)
    assert set(bad["figures"]) == set(good["figures"])
    assert set(bad["figures"]["phases_s"]) == set(good["figures"]["phases_s"])
    assert set(bad["figures"]["memory_mb"]) == set(good["figures"]["memory_mb"])
    assert shape(bad["environment"]) == shape(good["environment"])


def test_table_shows_runs_and_failures(tiny_run):
    good = tiny_run["runs"][0]
    bad = dict(good, name="broken", figures=dict(good["figures"], ok=False, error="boom"))
    text = bench.table([good, bad])
    lines = text.splitlines()
    assert lines[0].startswith("| run | steps/s")
    assert len(lines) == 4 and "| tiny |" in lines[2] and "FAILED: boom" in lines[3]


def test_matrix_runs_each_line_as_its_own_command(tmp_path, monkeypatch, capsys):
    """Each line becomes a `python -m dreambooth bench` command (run in-process here, to keep
    the test fast); command-line options apply to every line unless the line sets them."""
    matrix = tmp_path / "m.json"
    matrix.write_text(json.dumps([
        {"name": "a", "optimizer": "adamw"},
        {"name": "b", "options": {"optimizer": "sgd", "steps": 1}},
    ]))
    commands = []

    def fake_run(argv, **kwargs):
        assert argv[:4] == [sys.executable, "-m", "dreambooth", "bench"]
        commands.append(argv)
        code = bench.bench_main(argv[4:])
        return subprocess.CompletedProcess(argv, code, "", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    out = tmp_path / "all.json"
    code = bench.bench_main(FAST + ["--no-export", "--no-prior", "--sample-steps", "0",
                                    "--matrix", str(matrix), "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["schema"] == 1 and [r["name"] for r in data["runs"]] == ["a", "b"]
    a, b = data["runs"]
    assert a["options"]["optimizer"] == "adamw" and b["options"]["optimizer"] == "sgd"
    assert a["options"]["steps"] == 2 and b["options"]["steps"] == 1  # the line wins
    assert a["options"]["export"] is False  # the command line applies to every line
    assert b["figures"]["measured_steps"] == 1
    assert len(commands) == 2 and "--quiet" in commands[0]
    printed = capsys.readouterr().out
    assert "| a |" in printed and "| b |" in printed


def test_named_matrices_resolve():
    default = bench.load_matrix("default")
    assert [e["name"] for e in default][:2] == ["baseline", "+8bit-adam"]
    base = bench.run_options(bench.build_parser().parse_args([]))
    cpu = [bench.resolve_entry(e, base, cuda=False) for e in default]
    gpu = [bench.resolve_entry(e, base, cuda=True) for e in default]
    assert {o["precision"] for o in cpu} == {"no"}  # no fp16 on the CPU
    assert [o["precision"] for o in gpu] == ["no"] + ["fp16"] * 4
    assert [o["cache"] for o in cpu] == [False, False, False, True, True]
    assert cpu[-1]["train_text_encoder"] and not cpu[-2]["train_text_encoder"]
    for options in cpu:  # every line is a valid command line
        bench.build_parser().parse_args(bench.options_to_argv(options))


def test_bad_matrix_files_are_explained(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "x", "optimiser": "adamw"}]))
    with pytest.raises(SystemExit, match="optimiser"):
        bench.load_matrix(str(bad))
    with pytest.raises(SystemExit, match="neither"):
        bench.load_matrix(str(tmp_path / "missing.json"))


def test_spread_figures():
    s = bench_run.spread([1.0, 2.0, 3.0, 4.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["n"] == 4
    assert bench_run.spread([]) is None
    assert bench_run.spread([2.0])["iqr_pct"] == 0


def test_repeats_report_the_median_one(tiny_run):
    def with_speed(speed, ok=True):
        run = json.loads(json.dumps(tiny_run["runs"][0]))
        run["figures"]["ok"] = ok
        run["figures"]["steps_per_s"]["median"] = speed
        return run

    chosen = bench.median_repeat([with_speed(3.0), with_speed(1.0), with_speed(2.0),
                                  with_speed(None, ok=False)])
    assert chosen["figures"]["steps_per_s"]["median"] == 2.0
    reps = chosen["figures"]["repeats"]
    assert reps["n"] == 4 and reps["failed"] == 1
    assert reps["steps_per_s_medians"] == [3.0, 1.0, 2.0, None]
    assert len(reps["other_cpu_percent_medians"]) == 4
    assert set(chosen["figures"]) == set(bench.FIGURE_KEYS)


def test_repeat_without_a_matrix_repeats_the_single_run(monkeypatch, tmp_path):
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1, "", "Killed")  # as if out of memory

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    out = tmp_path / "r.json"
    assert bench.bench_main(FAST + ["--repeat", "2", "--name", "solo", "--json", str(out)]) == 1
    assert len(calls) == 2 and all("--steps" in argv for argv in calls)
    [run] = json.loads(out.read_text())["runs"]
    assert run["name"] == "solo" and run["figures"]["ok"] is False
    assert "Killed" in run["figures"]["error"]
    assert run["figures"]["repeats"]["failed"] == 2
    assert set(run["figures"]) == set(bench.FIGURE_KEYS)
    assert set(run["figures"]["phases_s"]) == set(bench.PHASES)
    assert run["environment"]["versions"]["torch"] and "load" in run["environment"]


def test_the_sdxl_shaped_model_benchmarks_through_the_same_engine(tmp_path):
    """--size sdxl-tiny: the whole path (base file in the SGM layout, load, class pictures,
    training, export) on the SDXL-shaped model; --size sdxl is the real architecture."""
    out = tmp_path / "xl.json"
    argv = [a if a != "tiny" else "sdxl-tiny" for a in FAST] + ["--optimizer", "adafactor",
                                                                 "--json", str(out)]
    assert bench.bench_main(argv) == 0
    [run] = json.loads(out.read_text())["runs"]
    assert run["figures"]["ok"] is True and run["figures"]["export_bytes"] > 0
    assert run["command"].startswith("python -m dreambooth bench --size sdxl-tiny")
    assert run["options"]["optimizer"] == "adafactor"
    configs = tiny.full_sdxl_configs(deep_layers=4)
    assert configs["unet"]["cross_attention_dim"] == 2048
    assert configs["unet"]["transformer_layers_per_block"] == [1, 2, 4]


def test_lora_lines_benchmark_the_adapter(tmp_path, tiny_run):
    """--method lora: the same run training an adapter; its file is the small LoRA file."""
    out = tmp_path / "lora.json"
    assert bench.bench_main(FAST + ["--method", "lora", "--rank", "8", "--json", str(out)]) == 0
    [run] = json.loads(out.read_text())["runs"]
    assert run["figures"]["ok"] is True
    assert 0 < run["figures"]["export_bytes"] < tiny_run["runs"][0]["figures"]["export_bytes"] / 4
    assert "--method lora --rank 8" in run["command"]
    names = [e["name"] for e in bench.load_matrix("lora")]
    assert names == ["full", "lora-r16", "lora-r32", "lora-r32+te"]


def test_the_flux_model_benchmarks_through_the_same_engine(tmp_path):
    """--size flux-tiny: a Flux.1 LoRA through the whole path (an all-in-one base file, load,
    class pictures by the Flux pipeline, training, export); --size flux is Flux.1's real widths
    at --flux-depth blocks (its configs checked here, the model too large to build in a test)."""
    from dreambooth.models.tiny_flux import full_size_configs

    out = tmp_path / "flux.json"
    argv = [a if a != "tiny" else "flux-tiny" for a in FAST] + ["--method", "lora",
                                                                 "--json", str(out)]
    assert bench.bench_main(argv) == 0
    [run] = json.loads(out.read_text())["runs"]
    assert run["figures"]["ok"] is True and 0 < run["figures"]["export_bytes"]
    assert run["command"].startswith("python -m dreambooth bench --size flux-tiny")
    configs = full_size_configs(depth=2, single_depth=4)["transformer"]
    assert (configs["num_attention_heads"] * configs["attention_head_dim"],
            configs["joint_attention_dim"], configs["num_single_layers"]) == (3072, 4096, 4)
