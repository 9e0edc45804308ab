"""Command line: ``python -m dreambooth {train,ui,demo,convert,extract-lora,check,caption,bench} ...``."""
from __future__ import annotations

import importlib
import sys

# Each subcommand lives in the module that owns it, imported only when used (torch is slow to load).
COMMANDS = {
    "train": ("dreambooth.app.cli", "train_main", "train a model from a config JSON"),
    "demo": ("dreambooth.app.cli", "demo_main", "train the built-in tiny model on generated pictures"),
    "check": ("dreambooth.data.dataset_check", "check_main", "report on the pictures of a config"),
    "caption": ("dreambooth.app.cli", "caption_main", "caption pictures with the WebUI's interrogators"),
    "convert": ("dreambooth.models.export", "convert_main", "single file <-> diffusers folder"),
    "extract-lora": ("dreambooth.app.cli", "extract_lora_main", "a LoRA from a full fine-tune minus its base"),
    "ui": ("dreambooth.tab.standalone", "standalone_main", "serve the tab without the WebUI"),
    "bench": ("dreambooth.app.bench", "bench_main", "measure speed and memory"),
}


def usage() -> str:
    lines = ["usage: python -m dreambooth COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function, _ = COMMANDS[argv[0]]
    return int(getattr(importlib.import_module(module_name), function)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
