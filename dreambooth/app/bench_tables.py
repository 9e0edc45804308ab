"""The bench's text output: one Markdown table of the runs, the environment and each run's
command, and the ``--memory`` line (split from :mod:`dreambooth.app.bench`, which measures)."""
from __future__ import annotations

from typing import Any


def memory_line(run: dict[str, Any]) -> str | None:
    """The text output's line for --memory: the peak and its largest parts."""
    f = run["figures"]
    if f.get("memory_peak_gb") is None:
        return None
    d = f.get("memory_profile") or {}
    parts = sorted((f.get("memory_by_category_gb") or {}).items(), key=lambda kv: -kv[1])
    split = " + ".join(f"{name} {value:.3g}" for name, value in parts if value > 0)
    cuda = (f"; CUDA max allocated over the step {d['cuda_max_allocated_gb']} GB"
            if d.get("cuda_max_allocated_gb") is not None else "")
    return (f"{run['name']}: tensor memory of step {d.get('step')} on {d.get('device')} (torch "
            f"profiler): peak {f['memory_peak_gb']:.3g} GB = {split}{cuda} (tensors the step "
            f"does not touch are not counted; profiled step {d.get('step_s')} s, analysis "
            f"{d.get('analysis_s')} s)")


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _gb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.2f}"


def table(runs: list[dict[str, Any]]) -> str:
    """One Markdown table (it pastes into the README as it is)."""
    cuda = any(r["environment"].get("device") == "cuda" for r in runs)
    mem_head = "peak alloc / reserved GB (train)" if cuda else "peak RSS GB (all / train)"
    head = ["run", "steps/s (median)", "spread (min-max)", "pictures/s", "s/step", mem_head,
            "load s", "class pics s", "caching s", "1st step s", "samples s", "export s",
            "export MB", "other CPU %"]
    rows = []
    for run in runs:
        f = run["figures"]
        if not f.get("ok"):
            rows.append([run["name"], f"FAILED: {f.get('error')}"] + [""] * (len(head) - 2))
            continue
        sps, pps, sec = f["steps_per_s"] or {}, f["pictures_per_s"] or {}, f["step_s"] or {}
        m, ph = f["memory_mb"], f["phases_s"]
        if cuda:
            mem = f"{_gb(m['training_peak_allocated'])} / {_gb(m['training_peak_reserved'])}"
        else:
            mem = f"{_gb(m['peak_rss'])} / {_gb(m['training_peak_rss'])}"
        load = run["environment"].get("load") or {}
        rows.append([
            run["name"], _fmt(sps.get("median")),
            f"{_fmt(sps.get('min'))}-{_fmt(sps.get('max'))}", _fmt(pps.get("median")),
            _fmt(sec.get("median")), mem, _fmt(ph.get("load")), _fmt(ph.get("class_pictures")),
            _fmt(ph.get("caching")), _fmt(ph.get("first_step")), _fmt(ph.get("samples")),
            _fmt(ph.get("export")),
            "-" if f["export_bytes"] is None else f"{f['export_bytes'] / 1e6:.1f}",
            f"{_fmt(load.get('other_cpu_percent_median'))} (max {_fmt(load.get('other_cpu_percent_max'))})",
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The environment once, and each run's exact command."""
    if not runs:
        return []
    env = runs[0]["environment"]
    v = env.get("versions", {})
    lines = [f"device: {env.get('device_name')} ({env.get('device')}), torch threads "
             f"{env.get('torch_threads')} of {env.get('cpu_count')} CPUs; "
             + ", ".join(f"{k} {v[k]}" for k in v if v[k])]
    for run in runs:
        load = run["environment"].get("load") or {}
        reps = run["figures"].get("repeats") or {}
        each = (f", steps/s of each repeat {reps.get('steps_per_s_medians')}"
                if reps.get("n", 1) > 1 else "")
        m = run["figures"].get("memory_mb") or {}
        if m.get("rss_before") is not None:
            each += (f"; process RSS {_gb(m.get('rss_before'))} GB before, "
                     f"{_gb(m.get('peak_rss'))} GB peak, {_gb(m.get('rss_after'))} GB after "
                     f"(own memory {_gb(m.get('anon_before'))} -> {_gb(m.get('anon_after'))} GB)")
        lines.append(f"{run['name']}: dtype {run['figures'].get('dtype')}, load average "
                     f"{load.get('loadavg_start')} -> {load.get('loadavg_end')}{each}; command: "
                     f"{run.get('command')}")
        memory = memory_line(run)
        if memory:
            lines.append(memory)
    return lines
