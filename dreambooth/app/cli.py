"""Headless commands: ``train CONFIG.json``, ``demo``, ``caption`` and ``extract-lora``.

Both run the same engine as the tab. ``train`` also runs under ``accelerate launch`` or
``torchrun`` on several processes; only rank 0 writes files. ``train`` checks its config exactly
as the tab and the API do (``service.prepare``: base model, name, outputs in the way) before any
work, and ends with an exit code that means one thing (``dreambooth.common.files.EXIT_*``):
0 done, 1 unexpected error, 2 bad input (nothing written), 3 a file could not be written
(the trained weights kept as a resume point), 4 cancelled (resume point written), 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from dreambooth.app.card_presets import CARDS
from dreambooth.common.config import TrainingConfig
from dreambooth.engine.trainer import Reporter, train


class ConsoleReporter(Reporter):
    """A tqdm progress bar with loss and ETA; log lines above it."""

    def __init__(self, quiet: bool = False, enabled: bool = True):
        self.quiet, self.enabled = quiet, enabled
        self.bar = None
        self.current = "loading"
        self.stop_requested = False

    def should_stop(self) -> bool:
        return self.stop_requested

    def stop_on_ctrl_c(self) -> None:
        """First Ctrl+C: stop at the next step, writing a resume point (and the model when
        save_on_cancel); a second one interrupts at once."""
        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log("stopping after this step (Ctrl+C again to interrupt at once)")

        signal.signal(signal.SIGINT, handler)

    def phase(self, name: str) -> None:
        self.current = name
        self._close()
        if self.enabled and not self.quiet:
            print(f"[{name}]", flush=True)

    def log(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def progress(self, step: int, total: int, loss: float | None, lr: float | None) -> None:
        if not self.enabled or self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total:
            self._close()
            self.bar = tqdm(total=total, desc=self.current, unit="step" if self.current == "training"
                            else "pic", dynamic_ncols=True, file=sys.stderr)
        self.bar.n = step
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}" if lr else None, refresh=False)
        self.bar.refresh()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth train",
                                     description="Train a model from a config JSON.")
    parser.add_argument("config", help="a TrainingConfig JSON file")
    parser.add_argument("--resume", action="store_true", help="continue from the latest resume point")
    parser.add_argument("--models-dir", help="models folder (default: the config's, else ./models)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--card", choices=CARDS, help="set the memory options that fit a GPU "
                        "of this size (the tab's Card size preset) over the config's")
    args = parser.parse_args(argv)
    main = is_main_process()
    from dreambooth.app import service
    from dreambooth.common import files
    from dreambooth.host import StandaloneHost

    try:
        config = TrainingConfig.load(args.config)
        if not config.model_name:
            config = replace(config, model_name=Path(args.config).stem)
        host = StandaloneHost(Path(args.models_dir or config.models_dir or "models"))
        config, paths = service.prepare(config, host, resume=args.resume)
        if args.card:
            processes = int(os.environ.get("WORLD_SIZE", "1") or 1)
            config, lines, _ = service.apply_card(args.card, config, processes)
            if main:
                print("\n".join(lines))
        reporter = ConsoleReporter(quiet=args.quiet, enabled=main)
        reporter.stop_on_ctrl_c()
        result = train(config, paths, reporter=reporter, resume=args.resume)
        reporter.phase("done" if not result.cancelled else "cancelled")
    except files.WriteError as exc:  # before ValueError: the run can be resumed
        print(f"error: {exc}", file=sys.stderr)
        return files.EXIT_WRITE_FAILED
    except ValueError as exc:  # ConfigError, DatasetError, CheckpointError: a message for people
        print(f"error: {exc}", file=sys.stderr)
        return files.EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: run again with --resume to continue from the last resume point",
              file=sys.stderr)
        return files.EXIT_INTERRUPTED
    if main:
        print(f"trained {result.steps}/{result.total_steps} steps in {result.seconds:.1f} s -> "
              f"{result.output_path}")
    return files.EXIT_CANCELLED if result.cancelled else files.EXIT_OK


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth demo",
                                     description="Train the built-in tiny model on pictures made "
                                                 "here: class pictures, caching, training with "
                                                 "prior preservation, samples, export.")
    parser.add_argument("--models-dir", default="models", help="where to write (default ./models)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--family", choices=("sd1", "sdxl", "flux"), default="sd1",
                        help="the tiny model's family: sd1 (default), sdxl (two text "
                             "encoders, size/crop conditioning, SGM layout) or flux (Flux.1 dev "
                             "by flow matching: a LoRA with kohya's Flux names)")
    args = parser.parse_args(argv)
    from dreambooth.app import demo

    started = time.time()
    result, paths = demo.run(Path(args.models_dir), steps=args.steps,
                             reporter=ConsoleReporter(), family=args.family)
    print()
    print(f"demo finished in {time.time() - started:.1f} s")
    print(f"  base model (tiny, built in code): "
          f"{demo.base_path(Path(args.models_dir), args.family)}")
    print(f"  pictures:        {demo.pictures_dir(Path(args.models_dir))}")
    print(f"  work folder:     {paths.work_dir}  (config, log, samples, class pictures)")
    print(f"  trained model:   {result.output_path}")
    return 0


def caption_main(argv: list[str]) -> int:
    """``python -m dreambooth caption [FOLDER ...] [--config CONFIG.json] [--captioner NAME] ...``:
    caption files for the pictures that have none. Our captioners (blip-base, blip-large,
    wd-*-tagger-v3) run anywhere, their model downloaded on first use into
    ``<models>/captioners``; the WebUI's interrogators (``--interrogator blip|clip|deepbooru``)
    only inside the WebUI's process (elsewhere: exit code 2, nothing written)."""
    from dreambooth.common import files
    from dreambooth.data import captions
    from dreambooth.data.captioners import TaggerOptions
    from dreambooth.data.captions import CaptionError, CaptionFolder, InterrogatorError
    from dreambooth.host import StandaloneHost, get_host

    names = list(captions.CAPTIONERS) + list(captions.INTERROGATORS)
    defaults = TaggerOptions()
    parser = argparse.ArgumentParser(
        prog="python -m dreambooth caption",
        description="Write caption files for pictures that have none, with our captioners (no "
                    "WebUI needed) or the WebUI's interrogators (inside its process).")
    parser.add_argument("folders", nargs="*", help="picture folders (default: the config's "
                                                   "instance folders)")
    parser.add_argument("--config", help="a TrainingConfig JSON: its instance folders, caption "
                                         "extension, subfolder and background settings")
    parser.add_argument("--captioner", choices=names, help="; ".join(
        f"{k}: {captions.describe(k)}" for k in names) + " (default: the WebUI's blip inside "
        f"the WebUI, else {captions.DEFAULT_CAPTIONER})")
    parser.add_argument("--interrogator", choices=list(captions.INTERROGATORS),
                        help="the WebUI's interrogator (the same as --captioner blip|clip|"
                             "deepbooru)")
    parser.add_argument("--models-dir", help="models folder: our captioners' files are in its "
                        "captioners/ subfolder (default: the WebUI's, else "
                        "$DREAMBOOTH_MODELS_DIR or ./models)")
    parser.add_argument("--prefix", default="", help="text every caption starts with, e.g. "
                        f"'ohwx dog,'; {captions.INSTANCE} = the concept's instance prompt (--config)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    parser.add_argument("--extension", help="caption file extension (default: the config's, "
                                            "else .txt)")
    parser.add_argument("--recursive", action="store_true", help="pictures in subfolders too")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    tagger = parser.add_argument_group("WD tagger options (wd-*-tagger-v3)")
    tagger.add_argument("--general-threshold", type=float, default=defaults.general_threshold,
                        help=f"general tags above this confidence (default "
                             f"{defaults.general_threshold})")
    tagger.add_argument("--character-threshold", type=float,
                        default=defaults.character_threshold,
                        help=f"character tags above this confidence (default "
                             f"{defaults.character_threshold})")
    tagger.add_argument("--rating", action="store_true", help="add the rating tag")
    tagger.add_argument("--no-characters", action="store_true", help="leave character tags out")
    tagger.add_argument("--keep-underscores", action="store_true",
                        help="write long_hair, not long hair")
    tagger.add_argument("--exclude", default="", help="comma-separated tags never written")
    tagger.add_argument("--max-tags", type=int, default=0,
                        help="at most this many tags, the most confident first (default 0: no "
                             "limit)")
    args = parser.parse_args(argv)
    options = TaggerOptions(general_threshold=args.general_threshold,
                            character_threshold=args.character_threshold,
                            include_rating=args.rating, include_characters=not args.no_characters,
                            underscores_to_spaces=not args.keep_underscores,
                            exclude=TaggerOptions.parse_exclude(args.exclude),
                            max_tags=args.max_tags)
    try:
        config = TrainingConfig.load(args.config) if args.config else TrainingConfig()
        host = get_host()
        webui = host.interrogators() if host.is_webui else []
        name = args.captioner or args.interrogator or captions.default_captioner(webui)
        models = Path(args.models_dir).expanduser() if args.models_dir else None
        root = captions.models_root(StandaloneHost(models) if models else host)
        request = captions.request_from_config(config, captioner=name, prefix=args.prefix,
                                               overwrite=args.overwrite, tagger=options,
                                               models_dir=root)
        if args.folders:
            request = replace(request, folders=tuple(CaptionFolder(Path(f).expanduser(), args.prefix)
                                                     for f in args.folders))
        request = replace(request, recursive=request.recursive or args.recursive,
                          caption_extension=args.extension or request.caption_extension)
        tasks = captions.check(request, webui)
        reporter = _CaptionConsole(quiet=args.quiet)
        previous = signal.getsignal(signal.SIGINT)
        reporter.stop_on_ctrl_c()  # first Ctrl+C: stop after the current picture
        try:
            summary = captions.caption_pictures(request, tasks, host, reporter)
        finally:
            signal.signal(signal.SIGINT, previous)
    except InterrogatorError as exc:  # the captioner failed (the WebUI's console has details)
        print(f"error: {exc}", file=sys.stderr)
        return files.EXIT_ERROR
    except files.WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return files.EXIT_WRITE_FAILED
    except (CaptionError, ValueError) as exc:  # no such captioner here, no model offline, bad input
        print(f"error: {exc}", file=sys.stderr)
        return files.EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: the captions written so far are complete", file=sys.stderr)
        return files.EXIT_INTERRUPTED
    reporter.phase("cancelled" if summary.cancelled else "done")
    return files.EXIT_CANCELLED if summary.cancelled else files.EXIT_OK


class _CaptionConsole(ConsoleReporter):
    """The console reporter, which also prints a captioner's download progress."""

    def detail(self, text: str) -> None:
        if self.current == "downloading" and not self.quiet:
            self.log(text)


def extract_lora_main(argv: list[str]) -> int:
    """``python -m dreambooth extract-lora TRAINED BASE OUT --rank N [--conv-rank M] ...``: a LoRA
    file of what a full fine-tune changed (``dreambooth.models.adapters.extract``). Exit codes: 0 written,
    2 bad input (unreadable models, other families or shapes, nothing differs, OUT exists without
    --overwrite; nothing written), 3 the file could not be written, 130 Ctrl+C (nothing written)."""
    from dreambooth.common import files
    from dreambooth.models.adapters import extract
    from dreambooth.models.adapters.file import EXPORT_DTYPES

    parser = argparse.ArgumentParser(
        prog="python -m dreambooth extract-lora",
        description="Extract a LoRA from a full fine-tune: the SVD of TRAINED minus BASE in every "
                    "layer a LoRA trains, cut to --rank.")
    parser.add_argument("trained", help="the fine-tuned model (.safetensors/.ckpt or a diffusers "
                                        "folder)")
    parser.add_argument("base", help="the model it was trained from (same family and shapes)")
    parser.add_argument("out", help="the LoRA file to write (.safetensors)")
    parser.add_argument("--rank", type=int, required=True, help="rank (dim) of the linear "
                        "layers and 1x1 convolutions; alpha = rank")
    parser.add_argument("--conv-rank", type=int, default=0, help="rank of the 3x3 convolutions "
                        "of the ResNet blocks (LoCon); 0 (default): no convolutions")
    parser.add_argument("--layers", choices=extract.LAYER_CHOICES, default="attention_mlp",
                        help="attention only, or attention with feed-forward and projections "
                             "(default)")
    parser.add_argument("--dtype", choices=tuple(EXPORT_DTYPES), default="fp16",
                        help="precision of the written tensors (default fp16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    try:
        out, report = extract.extract_lora_file(
            args.trained, args.base, args.out, rank=args.rank, conv_rank=args.conv_rank,
            layers=args.layers, dtype=args.dtype, overwrite=args.overwrite)
    except files.WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return files.EXIT_WRITE_FAILED
    except ValueError as exc:  # CheckpointError, ModelMismatchError, OutputExistsError
        print(f"error: {exc}", file=sys.stderr)
        return files.EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return files.EXIT_INTERRUPTED
    for line in report.lines():  # a rank larger than every layer is said there (capped)
        print(line)
    rank, conv_rank = report.rank_used or args.rank, report.conv_rank_used or args.conv_rank
    print(f"wrote {out} ({'locon' if args.conv_rank else 'lora'}, rank {rank}"
          + (f", conv rank {conv_rank}" if args.conv_rank else "") + f", {args.dtype})")
    return files.EXIT_OK
