"""Benchmarks: speed and memory of every phase of a real training run.

``python -m dreambooth bench`` runs the real engine (:func:`dreambooth.engine.trainer.train`) on a model
built in code -- ``--size tiny`` (seconds on a CPU) or ``--size sd15`` (SD1.5's real architecture
with random weights: the same FLOPs and memory as the real model) -- and reports, for N measured
steps after warm-up: steps/s and pictures/s (median and spread), peak memory (CUDA allocated and
reserved, or the process's peak RSS on the CPU), the time of each phase, the export size and the
environment, including how busy the machine was (shared machines make steps 10-20x slower).
``--memory`` adds one step after the measured ones, run under PyTorch's profiler, and reports its
peak tensor memory split into parameters, gradients, optimizer state, activations, temporaries
and the profiler's other categories (:mod:`dreambooth.engine.memory_profile`).

``--matrix NAME|FILE`` runs a list of option sets, each in a fresh subprocess so memory peaks do
not leak from one run into the next, and prints one comparison table. ``--json PATH`` writes::

    {"schema": 1, "runs": [{"name", "options", "figures", "environment"}]}

Every run carries every key (``null`` where a figure does not apply), so a script can compare two
files key by key; see :data:`FIGURE_KEYS`. A change of meaning bumps ``schema``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dreambooth.app.bench_run import (FIGURE_KEYS, OPTION_KEYS, PHASES,  # noqa: F401
                                      PRESET_OPTIONS, SCHEMA, SIZE_FAMILY, SIZES, _cuda_available,
                                      _loadavg, empty_figures, environment, run_once)
from dreambooth.app.bench_tables import _fmt, summary_lines, table

# The default matrix follows the issue: each line adds one thing to the one above, except
# "no-cache", which is "+cache" without it (what the caches save). On CUDA the second line also
# turns on fp16 (the seed's setup); on the CPU fp16 does not exist, so it stays fp32.
MATRICES: dict[str, list[dict[str, Any]]] = {
    "default": [
        {"name": "baseline", "precision": "no", "optimizer": "adamw",
         "gradient_checkpointing": False, "cache": False, "train_text_encoder": False},
        {"name": "+8bit-adam", "precision": "fp16@cuda", "optimizer": "adamw8bit",
         "gradient_checkpointing": False, "cache": False, "train_text_encoder": False},
        {"name": "+grad-ckpt", "precision": "fp16@cuda", "optimizer": "adamw8bit",
         "gradient_checkpointing": True, "cache": False, "train_text_encoder": False},
        {"name": "+cache", "precision": "fp16@cuda", "optimizer": "adamw8bit",
         "gradient_checkpointing": True, "cache": True, "train_text_encoder": False},
        {"name": "+text-encoder", "precision": "fp16@cuda", "optimizer": "adamw8bit",
         "gradient_checkpointing": True, "cache": True, "train_text_encoder": True},
    ],
    # LoRA against full training (rank 16 and 32, without and with the text encoder); the
    # full line is "+cache" of the default matrix.
    "lora": [
        {"name": "full", "method": "full", "precision": "fp16@cuda", "optimizer": "adamw8bit",
         "gradient_checkpointing": True, "cache": True, "train_text_encoder": False},
        {"name": "lora-r16", "method": "lora", "rank": 16, "precision": "fp16@cuda",
         "optimizer": "adamw8bit", "gradient_checkpointing": True, "cache": True,
         "train_text_encoder": False},
        {"name": "lora-r32", "method": "lora", "rank": 32, "precision": "fp16@cuda",
         "optimizer": "adamw8bit", "gradient_checkpointing": True, "cache": True,
         "train_text_encoder": False},
        {"name": "lora-r32+te", "method": "lora", "rank": 32, "precision": "fp16@cuda",
         "optimizer": "adamw8bit", "gradient_checkpointing": True, "cache": True,
         "train_text_encoder": True},
    ],
    # Two short lines: what the tests run.
    "smoke": [
        {"name": "adamw", "optimizer": "adamw"},
        {"name": "adamw+ckpt", "optimizer": "adamw", "gradient_checkpointing": True},
    ],
}


# --- Command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from dreambooth.app.card_presets import CARDS
    from dreambooth.common.config import (ATTENTION, OPTIMIZERS, PRECISIONS, TRAINED_PRECISIONS,
                                          TRAINING_METHODS)

    p = argparse.ArgumentParser(
        prog="python -m dreambooth bench",
        description="Measure speed and memory of a real training run on a model built in code.")
    p.add_argument("--size", choices=SIZES, default="tiny",
                   help="tiny: seconds on a CPU; sd15: SD1.5's real architecture, random weights; "
                        "sdxl-tiny: the tiny SDXL-shaped model; sdxl: SDXL base's real "
                        "architecture (see --sdxl-depth); flux-tiny: the tiny Flux.1; flux: "
                        "Flux.1's real widths at a few blocks (see --flux-depth; LoRA only)")
    p.add_argument("--sdxl-depth", type=int, default=10,
                   help="transformer layers of SDXL's lowest level (10 in SDXL; fewer makes the "
                        "largest SDXL-shaped model a small machine holds)")
    p.add_argument("--flux-depth", type=int, default=1,
                   help="--size flux: double blocks (and twice as many single ones); Flux.1 "
                        "has 19 and 38")
    p.add_argument("--resolution", type=int, default=64, help="training resolution in pixels")
    p.add_argument("--batch-size", type=int, default=1, help="instance pictures per step")
    p.add_argument("--steps", type=int, default=5, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="steps run before measuring (>= 1)")
    p.add_argument("--precision", choices=PRECISIONS, default="no",
                   help="mixed precision (fp16 needs CUDA; on the CPU it falls back to fp32)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--method", choices=TRAINING_METHODS, default="full",
                   help="full model or an adapter (lora, locon, loha, lokr)")
    p.add_argument("--rank", type=int, default=16, help="adapter rank (alpha = rank / 2)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=False)
    p.add_argument("--attention", choices=ATTENTION, default="sdpa")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="cache latents and text embeddings (--no-cache: encode at every step)")
    p.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--prior", action=argparse.BooleanOptionalAction, default=True,
                   help="prior preservation: a class picture next to each instance picture")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the UNet in place (the config's compile_unet; torch >= 2.2)")
    p.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="write the base model as a single file, load it back the way the "
                        "trainer does, and time the export of the trained checkpoint")
    p.add_argument("--class-pictures", type=int, default=4,
                   help="class pictures generated by the model (0: drawn, the phase only "
                        "checks the folder)")
    p.add_argument("--sample-steps", type=int, default=4,
                   help="denoising steps of the class pictures and of the end-of-run sample "
                        "(0: no sample)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=False,
                   help="run one more step after the measured ones under PyTorch's profiler "
                        "and report its peak tensor memory by category (parameters, "
                        "gradients, optimizer state, activations, ...); the step is not "
                        "one of the measured ones")
    p.add_argument("--fused-backward", action=argparse.BooleanOptionalAction, default=False,
                   help="step each weight in the backward pass and free its gradient (the "
                        "config's fused_backward; sets max_grad_norm 0)")
    p.add_argument("--trained-precision", choices=TRAINED_PRECISIONS, default="fp32",
                   help="bf16: the trained weights in bf16 with stochastic rounding (needs "
                        "--precision bf16)")
    p.add_argument("--base-8bit", action=argparse.BooleanOptionalAction, default=False,
                   help="adapters: the frozen base's linear layers in int8 (base_weights_8bit; "
                        "Flux: fp8)")
    p.add_argument("--base-4bit", action=argparse.BooleanOptionalAction, default=False,
                   help="adapters: the frozen base's linear layers in NF4 (base_weights_4bit; "
                        "bitsandbytes)")
    p.add_argument("--blocks-to-swap", type=int, default=0,
                   help="Flux: transformer blocks kept in host memory and copied in as their "
                        "turn comes (blocks_to_swap; needs --gradient-checkpointing)")
    p.add_argument("--preset", choices=("",) + tuple(CARDS), default="",
                   help="the memory settings of the tab's card-size preset for this run "
                        "(options given on the command line win)")
    p.add_argument("--name", default="", help="name of the run in the table and the JSON")
    p.add_argument("--work-dir", default="",
                   help="keep the run's files here (default: a temporary folder, removed)")
    p.add_argument("--json", default="", help="write the figures to this JSON file")
    p.add_argument("--matrix", default="",
                   help=f"run a list of option sets, each in a fresh process: "
                        f"{' | '.join(MATRICES)} | a JSON file (a list of objects with a name "
                        f"and options named as the flags, e.g. \"gradient_checkpointing\")")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each line N times in fresh processes, interleaved, and report the "
                        "median one (shared machines: FACTS.md)")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    return p


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in OPTION_KEYS}


def options_to_argv(options: dict[str, Any]) -> list[str]:
    """The flags that reproduce ``options`` (printed with each matrix line and used to run it)."""
    argv: list[str] = []
    for key in OPTION_KEYS:
        if key not in options:
            continue
        value, flag = options[key], "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


class MatrixError(SystemExit):
    """A --matrix that cannot be read (an unknown name, not a JSON list of runs, an unknown
    option): bench_main makes it a usage error, exit 2 (a SystemExit with a text exits 1)."""


def option_problems(options: dict[str, Any]) -> list[str]:
    """--rank and --resolution outside what the trainer's config takes: said before any work,
    as a usage error (exit 2), not as a failed run (exit 1)."""
    from dreambooth.common.config import RANGES

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    problems = []
    rank, ranks = options.get("rank"), RANGES["lora_rank"]
    low, high = int(ranks.low), int(ranks.high)
    if not (whole(rank) and low <= rank <= high):
        problems.append(f"--rank must be a whole number from {low} to {high}, not {rank!r}")
    size, top = options.get("resolution"), int(RANGES["resolution"].high)
    if not (whole(size) and 64 <= size <= top and size % 8 == 0):  # the config's own rule
        problems.append(f"--resolution must be a multiple of 8 from 64 to {top}, not {size!r}")
    return problems


def checked_line(where: str, options: dict[str, Any]) -> dict[str, Any]:
    """A matrix line's options as its command line parses them ("8" becomes 8); a value the
    line's command would refuse is a usage error (exit 2) naming the line, before any line runs."""
    parser = build_parser()
    parser.prog = f"{parser.prog} ({where})"
    parsed = run_options(parser.parse_args(options_to_argv(options)))
    for problem in option_problems(parsed):
        parser.error(problem)
    return {key: parsed[key] for key in options}


def load_matrix(spec: str) -> list[dict[str, Any]]:
    """A named matrix or a JSON file: a list of {"name", option: value ...} (or {"runs": [...]}),
    with options flat or under "options". MatrixError names what is wrong."""
    if spec in MATRICES:
        return copy.deepcopy(MATRICES[spec])
    path = Path(spec)
    if not path.is_file():
        raise MatrixError(f"--matrix: {spec!r} is neither {' nor '.join(MATRICES)} nor a file")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # the decoder recurses once per level of nesting
        raise MatrixError(f"--matrix {spec}: nested too deeply to be a list of runs") from None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise MatrixError(f"--matrix {spec}: not a readable JSON file ({exc})") from None
    entries = loaded.get("runs", []) if isinstance(loaded, dict) else loaded
    if not isinstance(entries, list) or not entries:
        raise MatrixError(f"--matrix {spec}: holds no list of runs")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("options", {}), dict):
            raise MatrixError(f"--matrix {spec}: entry {i} is not an object")
        flat = dict(entry.get("options", {}), **{k: v for k, v in entry.items() if k != "options"})
        unknown = set(flat) - set(OPTION_KEYS) - {"name"}
        if unknown:
            raise MatrixError(f"--matrix {spec}: entry {i} has unknown options {sorted(unknown)}")
        flat.setdefault("name", f"run{i + 1}")
        out.append(flat)
    return out


def resolve_entry(entry: dict[str, Any], base: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """A matrix line over the command line's options; "fp16@cuda" means fp16 on CUDA, else fp32."""
    options = dict(base)
    options.update({k: v for k, v in entry.items() if k != "name"})
    if options.get("precision") == "fp16@cuda":
        options["precision"] = "fp16" if cuda else "no"
    return options


# --- Tables and JSON (the text output: dreambooth.app.bench_tables) ------------------------------

def write_json(path: str | Path, runs: list[dict[str, Any]]) -> Path:
    from dreambooth.common.files import write_text

    body = {"schema": SCHEMA, "runs": [
        {"name": r["name"], "options": r["options"], "figures": r["figures"],
         "environment": r["environment"], "command": r.get("command")} for r in runs]}
    return write_text(Path(path), json.dumps(body, indent=2, sort_keys=True) + "\n",
                      overwrite=True)


def command_for(options: dict[str, Any], name: str) -> str:
    argv = ["python", "-m", "dreambooth", "bench", *options_to_argv(options), "--name", name]
    return shlex.join(argv)


# --- Entry points ----------------------------------------------------------------------------

@contextlib.contextmanager
def _work_dir(given: str) -> Iterator[Path]:
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="dreambooth-bench-") as tmp:
            yield Path(tmp)


def single(args: argparse.Namespace) -> dict[str, Any]:
    options = run_options(args)
    name = args.name or "run"
    with _work_dir(args.work_dir) as root:
        run = run_once(options, root, quiet=args.quiet)
    run["name"] = name
    run["command"] = command_for(options, name)
    return run


def matrix(args: argparse.Namespace, explicit: set[str]) -> list[dict[str, Any]]:
    """Each line in a fresh ``python -m dreambooth bench`` process, so peaks do not leak.

    With ``--repeat N`` the whole list is run N times, line after line (so a burst of load from
    another process hits every line, not one), and each line reports its median repeat."""
    entries = load_matrix(args.matrix) if args.matrix else [{"name": args.name or "run"}]
    base = run_options(args)
    cuda = _cuda_available()
    lines = []
    for i, entry in enumerate(entries, 1):
        # Options given on the command line win over the matrix (e.g. --size sd15 --steps 3),
        # except the ones the matrix line sets itself.
        options = resolve_entry(entry, base, cuda)
        for key in explicit:
            if key not in entry:
                options[key] = base[key]
        name = entry.get("name", f"run{i}")
        lines.append((name, checked_line(f"--matrix {args.matrix} line {name!r}", options)))
    repeats: list[list[dict[str, Any]]] = [[] for _ in lines]
    for r in range(args.repeat):
        for i, (name, options) in enumerate(lines):
            if not args.quiet:
                print(f"[{r * len(lines) + i + 1}/{args.repeat * len(lines)}] {name}: "
                      f"{command_for(options, name)}", file=sys.stderr, flush=True)
            work = (Path(args.work_dir) / f"{i + 1:02d}-{name}-{r + 1}") if args.work_dir else None
            run = run_child(name, options, work)
            repeats[i].append(run)
            if not args.quiet:
                f = run["figures"]
                sps = (f.get("steps_per_s") or {}).get("median")
                print(f"    {'ok' if f.get('ok') else 'FAILED'}: {_fmt(sps)} steps/s"
                      + ("" if f.get("ok") else f" ({f.get('error')})"), file=sys.stderr,
                      flush=True)
    return [median_repeat(runs) for runs in repeats]


def run_child(name: str, options: dict[str, Any], work: Path | None) -> dict[str, Any]:
    """One run in a fresh process; a child that dies (out of memory, a crash) is a failed run."""
    with tempfile.TemporaryDirectory(prefix="dreambooth-bench-") as tmp:
        out = Path(tmp) / "run.json"
        argv = [sys.executable, "-m", "dreambooth", "bench", *options_to_argv(options),
                "--name", name, "--json", str(out), "--quiet"]
        if work is not None:
            argv += ["--work-dir", str(work)]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=str(Path(__file__).resolve().parents[2]))
        if out.is_file():
            return json.loads(out.read_text(encoding="utf-8"))["runs"][0]
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        figures = empty_figures()
        figures["error"] = f"exit {proc.returncode}: {' | '.join(tail)}"
        env = environment(_cuda_available(), options["threads"])
        env["load"] = {"loadavg_start": None, "loadavg_end": _loadavg(),
                       "other_cpu_percent_median": None, "other_cpu_percent_max": None,
                       "samples": 0}
        figures["device"] = env["device"]
        return {"name": name, "options": options, "figures": figures, "environment": env,
                "command": command_for(options, name)}


def median_repeat(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median steps/s (the lower middle one for an even count), its figures
    kept whole so they stay consistent with each other; every repeat's steps/s and machine load
    go under figures["repeats"]. Failed repeats count only when all failed."""
    ok = [r for r in runs if r["figures"].get("ok")]
    pool = sorted(ok, key=lambda r: r["figures"]["steps_per_s"]["median"]) if ok else runs
    chosen = copy.deepcopy(pool[(len(pool) - 1) // 2])
    chosen["figures"]["repeats"] = {
        "n": len(runs), "failed": len(runs) - len(ok),
        "steps_per_s_medians": [(r["figures"].get("steps_per_s") or {}).get("median")
                                for r in runs],
        "other_cpu_percent_medians": [
            (r["environment"].get("load") or {}).get("other_cpu_percent_median") for r in runs],
    }
    return chosen


def apply_card_preset(args: argparse.Namespace, explicit: set[str]):
    """Set the memory options of ``--preset``'s choice on ``args``, except those given on the
    command line; returns the choice (:class:`dreambooth.app.card_presets.CardChoice`)."""
    from dreambooth.app.card_presets import choose
    from dreambooth.common.config import TrainingConfig

    config = TrainingConfig(
        base_model="bench", model_name="bench", training_method=args.method,
        lora_rank=args.rank, lora_conv_rank=max(1, args.rank // 2),
        train_text_encoder=args.train_text_encoder, with_prior_preservation=args.prior,
        train_batch_size=args.batch_size, resolution=args.resolution)
    choice = choose(args.preset, config, SIZE_FAMILY[args.size], args.resolution)
    for field_name, option in PRESET_OPTIONS.items():
        if option not in explicit and field_name in choice.values:
            value = choice.values[field_name]
            if option == "precision" and value == "fp16" and not _cuda_available():
                value = "bf16"  # the CPU's half precision: the same bytes as fp16 on a GPU
            setattr(args, option, value)
    return choice


def _explicit_options(argv: list[str], parser: argparse.ArgumentParser) -> set[str]:
    """The options given on the command line (as opposed to left at their defaults)."""
    given = set()
    for action in parser._actions:
        for flag in action.option_strings:
            names = {flag}
            if isinstance(action, argparse.BooleanOptionalAction) and flag.startswith("--"):
                names.add("--no-" + flag[2:])
            if any(a == n or a.startswith(n + "=") for a in argv for n in names):
                given.add(action.dest)
    return given & set(OPTION_KEYS)


def bench_main(argv: list[str]) -> int:
    """Exit codes: 0 every run ok, 1 a run failed (its error is in the table and the JSON),
    2 bad options or --matrix (nothing ran), 3 the --json file could not be written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the first step is never "
                     "measured: it pays for lazy initialisation)")
    for problem in option_problems(run_options(args)):
        parser.error(problem)
    explicit = _explicit_options(argv, parser)
    if args.preset:
        choice = apply_card_preset(args, explicit)
        if not args.quiet:
            print(f"preset {choice.line()}", file=sys.stderr)
    if args.matrix or args.repeat > 1:
        try:
            runs = matrix(args, explicit)
        except MatrixError as exc:  # raised before any line ran
            parser.error(str(exc))
    else:
        runs = [single(args)]
    print(table(runs))
    for line in summary_lines(runs):
        print(line)
    if args.json:
        from dreambooth.common.files import EXIT_WRITE_FAILED, WriteError

        try:
            write_json(args.json, runs)
        except WriteError as exc:  # the table above still has every figure
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_WRITE_FAILED
        print(f"figures written to {args.json}")
    return 0 if all(r["figures"].get("ok") for r in runs) else 1
