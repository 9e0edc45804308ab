"""Compare runs (issue 28): the loss and validation curves of two or more runs on one plot, and
their samples at the same steps and seeds side by side — read from hand-made work folders."""
from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from dreambooth.app.run_history import (common_sample_steps, read_curves, sample_steps)
from dreambooth.common.config import TrainingConfig
from dreambooth.host import StandaloneHost
from dreambooth.tab.ui_compare import FEWER_THAN_TWO, compare, compare_plot_svg, compare_samples

from ui_fixtures import handlers


def make_run(work_dir: Path, losses: dict[int, float], validation: dict[int, float] | None = None,
             samples: list[tuple[int, int]] = (), tail: str = "") -> Path:
    """A work folder as a run leaves it: its config, its log (``tail`` appended as is, e.g. a
    line torn by a killed run) and its sample pictures (step, prompt index)."""
    logs = work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    TrainingConfig(model_name=work_dir.name).save(work_dir / "config.json")
    lines = [json.dumps({"step": s, "time": 1.0, "loss": v, "lr": 1e-4}) for s, v in losses.items()]
    lines += [json.dumps({"step": s, "time": 1.0, "event": "validation", "validation_loss": v,
                          "validation_per_timestep": [v, v], "validation_weights": "trained"})
              for s, v in (validation or {}).items()]
    if samples:
        folder = work_dir / "samples"
        folder.mkdir(exist_ok=True)
        for step, index in samples:
            path = folder / f"step-{step:06d}-{index}.png"
            colour = (step % 256, index * 60, sum(map(ord, work_dir.name)) % 256)  # each its own
            Image.new("RGB", (8, 8), colour).save(path)
            lines.append(json.dumps({"step": step, "time": 1.0, "event": "samples",
                                     "paths": [str(path)]}))
    (logs / "train.jsonl").write_text("\n".join(lines) + "\n" + tail, encoding="utf-8")
    return work_dir


def polylines(svg: str, kind: str) -> dict[str, str]:
    """data-run -> points of the plot's polylines of one kind (loss or val)."""
    return dict(re.findall(rf"<polyline class='dreambooth-compare-{kind}' data-run='([^']*)' "
                           r"points='([^']*)'", svg))


def three_runs(root: Path) -> None:
    make_run(root / "a", {1: 0.5, 2: 0.4, 3: 0.3, 4: 0.25}, {2: 0.45, 4: 0.40},
             [(2, 0), (2, 1), (4, 0), (4, 1)], tail='\n{"step": 5, "loss": 0.2')
    make_run(root / "b", {1: 0.6, 2: 0.5, 3: 0.45}, {2: 0.35, 3: 0.38},
             [(2, 0), (2, 1), (3, 0), (4, 0), (4, 1)])
    make_run(root / "c", {1: 0.7, 2: 0.6}, {}, [(2, 0), (2, 1), (4, 0)])


def test_the_curves_read_back_and_a_torn_or_broken_line_is_skipped(tmp_path):
    run = make_run(tmp_path / "a", {1: 0.5, 2: 0.4, 3: 0.3}, {2: 0.45, 3: 0.41},
                   tail='\nnot json\n7\n{"step": 4, "loss": 0.2')  # a run still being written
    curves = read_curves(run)
    assert curves.name == "a"
    assert curves.loss == [(1, 0.5), (2, 0.4), (3, 0.3)]
    assert curves.validation == [(2, 0.45), (3, 0.41)]
    assert curves.best_step == 3
    nothing = read_curves(tmp_path / "no such run")
    assert (nothing.loss, nothing.validation, nothing.best_step) == ([], [], None)


def test_the_plot_overlays_each_runs_loss_and_validation_with_its_best_step(tmp_path):
    three_runs(tmp_path)
    curves = [read_curves(tmp_path / name) for name in ("a", "b", "c")]
    svg = compare_plot_svg(curves)
    assert svg.startswith("<svg class='dreambooth-plot") and svg.endswith("</svg>")
    loss, val = polylines(svg, "loss"), polylines(svg, "val")
    assert set(loss) == {"a", "b", "c"} and set(val) == {"a", "b"}  # c has no validation
    assert len(loss["a"].split()) == 4 and len(val["b"].split()) == 2
    # one colour per run, the validation dashed
    colours = re.findall(r"class='dreambooth-compare-loss' data-run='\w' points='[^']*' "
                         r"style='fill:none;stroke:(#\w+)", svg)
    assert len(set(colours)) == 3
    assert svg.count("stroke-dasharray:5 3") == 2
    # the legend names every run with its best step; the best steps are marked on the plot
    for text in ("a (best: step 4)", "b (best: step 2)", ">c<"):
        assert text in svg
    assert dict(re.findall(r"class='dreambooth-compare-best' data-run='(\w)' data-step='(\d+)'",
                           svg)) == {"a": "4", "b": "2"}
    # one shared scale: the highest and lowest points of all the runs on the frame's edges
    top, height = (float(n) for n in re.search(
        r"<rect x='\d+' y='([\d.]+)' width='\d+' height='([\d.]+)'", svg).groups())
    ys = [float(p.split(",")[1]) for points in [*loss.values(), *val.values()]
          for p in points.split()]
    assert abs(min(ys) - top) < 0.11 and abs(max(ys) - (top + height)) < 0.11
    assert "step 1<" in svg and "step 4<" in svg


def test_the_plot_says_so_when_no_run_has_a_step(tmp_path):
    svg = compare_plot_svg([read_curves(tmp_path / "x"), read_curves(tmp_path / "y")])
    assert "no logged steps yet" in svg and "<polyline" not in svg
    assert "x (no steps)" in svg


def test_the_samples_pair_the_same_step_and_prompt_across_runs(tmp_path):
    host = StandaloneHost(tmp_path / "models")
    three_runs(host.work_root())
    assert sorted(sample_steps(host.work_dir("b"))) == [2, 3, 4]
    runs = [sample_steps(host.work_dir(n)) for n in ("a", "b")]
    assert common_sample_steps(runs) == [2, 4]
    items = compare_samples(["a", "b"], host)
    assert [caption for _, caption in items] == [
        "a · step 2 · prompt 0", "b · step 2 · prompt 0",
        "a · step 2 · prompt 1", "b · step 2 · prompt 1",
        "a · step 4 · prompt 0", "b · step 4 · prompt 0",
        "a · step 4 · prompt 1", "b · step 4 · prompt 1"]  # step 3 (b only) left out
    assert items[1][0] == str(host.work_dir("b") / "samples" / "step-000002-0.png")
    # with c: its step 4 has prompt 0 only, so prompt 1 of step 4 is left out
    captions = [caption for _, caption in compare_samples(["b", "a", "c"], host)]
    assert captions[-3:] == ["b · step 4 · prompt 0", "a · step 4 · prompt 0",
                             "c · step 4 · prompt 0"]
    assert len(captions) == 9


def test_fewer_than_two_runs_gives_the_message(tmp_path):
    host = StandaloneHost(tmp_path / "models")
    three_runs(host.work_root())
    for runs in ([], ["a"], ["a", "a"], None):
        plot, items = compare(runs, host)
        assert FEWER_THAN_TWO in plot and items == []


def test_the_tab_compares_the_runs_chosen_in_the_model_tab(fake_webui):
    from dreambooth.tab import ui

    host = ui.current_host()
    three_runs(host.work_root())
    (blocks, _, _), = ui.create_tab()
    config = blocks.get_config_file()
    by_elem = {c.get("props", {}).get("elem_id"): c for c in config["components"]}
    assert {"dreambooth_compare", "dreambooth_compare_runs", "dreambooth_compare_button",
            "dreambooth_compare_plot", "dreambooth_compare_gallery"} <= set(by_elem)
    assert by_elem["dreambooth_compare_runs"]["props"]["multiselect"] is True
    assert by_elem["dreambooth_compare"]["props"]["open"] is False
    listed = [c[1] if isinstance(c, (list, tuple)) else c
              for c in by_elem["dreambooth_compare_runs"]["props"]["choices"]]
    assert sorted(listed) == ["a", "b", "c"]

    (on_compare, outputs), = handlers(blocks, "dreambooth_compare_button", "click")
    assert outputs == ["dreambooth_compare_plot", "dreambooth_compare_gallery"]
    plot, gallery = on_compare(["a", "b"])
    assert set(polylines(plot, "loss")) == {"a", "b"}
    assert gallery["columns"] == 2 and len(gallery["value"]) == 8
    assert gallery["value"][0][1] == "a · step 2 · prompt 0"
    plot, gallery = on_compare(["a"])
    assert FEWER_THAN_TWO in plot and gallery["value"] == []

    # the runs list's refresh button refreshes the compare list too, keeping what is still there
    make_run(host.work_dir("d"), {1: 0.3})
    (refresh, outputs), = handlers(blocks, "dreambooth_refresh_runs", "click")
    assert outputs == ["dreambooth_runs", "dreambooth_compare_runs"]
    runs_update, compare_update = refresh(["a", "gone"])
    assert sorted(compare_update["choices"]) == sorted(runs_update["choices"]) == ["a", "b", "c", "d"]
    assert compare_update["value"] == ["a"]
