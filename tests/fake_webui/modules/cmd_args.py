"""The WebUI's command line options that the extension reads (``modules/cmd_args.py``).

The real WebUI parses ``sys.argv``; the fake parses ``$FAKE_WEBUI_ARGS`` so that pytest's own
arguments do not interfere.
"""
from __future__ import annotations

import argparse
import os
import shlex

parser = argparse.ArgumentParser(add_help=False)
parser.add_argument("--data-dir", type=str, default=None)
parser.add_argument("--models-dir", type=str, default=None)
if os.environ.get("FAKE_WEBUI_FLAVOUR") == "neo":  # Neo: lists of extra folders instead
    parser.add_argument("--ckpt-dirs", action="append", default=[])
    parser.add_argument("--vae-dirs", action="append", default=[])
else:
    parser.add_argument("--ckpt-dir", type=str, default=None)
    parser.add_argument("--vae-dir", type=str, default=None)
# Added by the built-in Lora extension's preload.py (its default: models/Lora; None here).
parser.add_argument("--lora-dir", type=str, default=None)
parser.add_argument("--ui-settings-file", type=str, default=None)
parser.add_argument("--api-auth", type=str, default=None)
parser.add_argument("--api", action="store_true")
parser.add_argument("--nowebui", action="store_true")
parser.add_argument("--skip-install", action="store_true")
parser.add_argument("--skip-prepare-environment", action="store_true")
parser.add_argument("--freeze-settings", action="store_true")
parser.add_argument("--ckpt", type=str, default=None)
parser.add_argument("--listen", action="store_true")
parser.add_argument("--share", action="store_true")
parser.add_argument("--server-name", type=str, default=None)
parser.add_argument("--cors-allow-origins", type=str, default=None)
parser.add_argument("--cors-allow-origins-regex", type=str, default=None)


def parse() -> argparse.Namespace:
    args, _ = parser.parse_known_args(shlex.split(os.environ.get("FAKE_WEBUI_ARGS", "")))
    return args
