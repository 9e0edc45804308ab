"""WebUI installer hook: installs the extension's own missing requirements, never the host's.

The WebUI runs this file at every start as a subprocess with its own folder on PYTHONPATH, so
``launch.run_pip`` is available. Only the standard library is imported here: importing torch (or
the ``dreambooth`` package) would slow every WebUI start and could fail before we can explain why.

What it never does: install, upgrade or downgrade the packages the WebUI pins (``HOST_PACKAGES``).
Every pip call carries a constraints file pinning their installed versions, because a bare
``pip install bitsandbytes`` would replace A1111's torch 2.1.2 with a multi-GB new build, and
whatever we changed there would be rolled back at the next start anyway.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import tempfile

PREFIX = "[DreamBooth]"

# The WebUI's packages: pinned in every pip call, never changed.
HOST_PACKAGES = (
    "torch", "torchvision", "transformers", "accelerate", "gradio", "safetensors", "pillow",
    "numpy", "fastapi", "pydantic", "huggingface-hub",
)
# The extension's own packages (requirements.txt). onnxruntime-gpu counts as onnxruntime (Neo's
# --onnxruntime-gpu installs it; both import as onnxruntime).
OWN_PACKAGES = ("diffusers", "bitsandbytes", "prodigyopt", "lycoris-lora", "ftfy", "regex", "tqdm",
                "onnxruntime", "onnxruntime-gpu")
# LoRA/LoCon/LoHa/LoKr training (lycoris-lora: torch, einops, toml; none of them host-pinned
# beyond torch, which the constraints keep). 4.1 is the API the adapters are written against.
LYCORIS = ("lycoris-lora>=4.1,<4.2", "4.1", "4.2")

# pip's words for "the index could not be reached".
_NETWORK_ERRORS = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|Name or service not known|"
    r"Network is unreachable|Connection refused|ConnectTimeout|Read timed out|ProxyError|"
    r"Could not fetch URL|getaddrinfo failed|\(from versions: none\)",
    re.IGNORECASE,
)

Version = tuple  # release numbers only, e.g. (2, 1, 2)


def parse_version(text: str) -> Version:
    """Release part of a version string: '2.1.2+cu121' -> (2, 1, 2); '0.32.0.dev0' -> (0, 32, 0)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", text or "")
    if not m:
        return ()
    return tuple(int(x) for x in m.group(1).split("."))


def _in_range(version: str, low: str, below: str | None) -> bool:
    v = parse_version(version)
    return v >= parse_version(low) and (below is None or v < parse_version(below))


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions(names=HOST_PACKAGES + OWN_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages we care about, by normalised name (absent = missing)."""
    found = {}
    for name in names:
        for candidate in (name, name.replace("-", "_"), name.capitalize()):
            try:
                found[normalize(name)] = importlib.metadata.version(candidate)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def bitsandbytes_choice(torch_version: str) -> tuple[str, str, str | None]:
    """(requirement to install, lowest accepted, first rejected) for the host's torch.

    The newest release each torch allows (bitsandbytes' own torch floor rises with each minor);
    0.50.x is also the first whose 8-bit optimizers run on the CPU. An installed release inside
    the accepted range is kept, so we never fight another extension over a working version.
    """
    t = parse_version(torch_version)[:2]
    if t < (2, 2):
        return "bitsandbytes==0.45.5", "0.43", "0.46"
    if t < (2, 3):
        return "bitsandbytes==0.47.0", "0.43", "0.48"
    if t < (2, 4):
        return "bitsandbytes>=0.49,<0.50", "0.43", "0.50"
    return "bitsandbytes>=0.50,<0.51", "0.43", None


def diffusers_choice(transformers_version: str | None) -> tuple[str, str, str | None]:
    """(requirement, lowest accepted, first rejected) for the host's transformers.

    transformers < 4.47 (A1111 4.30.2, Forge 4.46.1): diffusers 0.32-0.39 fail to import with
    4.30.2 (SiglipImageProcessor), so 0.31.x exactly. transformers 4.x >= 4.47: up to 0.39, since
    diffusers >= 0.40 needs huggingface-hub 1.x, which transformers 4.x and gradio refuse.
    """
    t = parse_version(transformers_version or "")[:2]
    if t and t < (4, 47):
        return "diffusers==0.31.0", "0.31", "0.32"
    if not t or t < (5, 0):
        return "diffusers>=0.31,<0.40", "0.31", "0.40"
    return "diffusers>=0.31", "0.31", None


def accelerate_choice(transformers_version: str | None) -> str:
    """The accelerate to add where the host has none (Forge Classic: its own code needs none):
    with transformers < 4.47, A1111's 0.21.0, the release the training is tested with there."""
    t = parse_version(transformers_version or "")[:2]
    return "accelerate==0.21.0" if t and t < (4, 47) else "accelerate>=1.0,<2"


def host_manages_bitsandbytes(launch_module) -> bool:
    """Forge Neo installs bitsandbytes itself, and only when started with ``--bnb`` (its first
    releases: unless ``--disable-bnb``): its launcher's arguments have those options. There we
    never install it; the 8-bit options say to start Neo with --bnb."""
    args = getattr(launch_module, "args", None)
    return hasattr(args, "bnb") or hasattr(args, "disable_bnb")


def plan_installs(installed: dict[str, str], *, host_manages_bitsandbytes: bool = False
                  ) -> list[tuple[str, str]]:
    """What to install, as (requirement, reason) pairs; empty when everything fits.

    ``installed`` maps package names (any spelling) to installed versions; a missing key means
    "not installed". Pure: no I/O, so the tests can try every host's versions.
    """
    have = {normalize(k): v for k, v in installed.items()}
    plan = []

    if "accelerate" not in have:
        plan.append((accelerate_choice(have.get("transformers")), "missing; the training runs on it"))

    torch = have.get("torch")
    if torch is not None and not host_manages_bitsandbytes:
        req, low, below = bitsandbytes_choice(torch)
        bnb = have.get("bitsandbytes")
        if bnb is None:
            plan.append((req, f"missing; fits torch {torch}"))
        elif not _in_range(bnb, low, below):
            plan.append((req, f"{bnb} does not fit torch {torch}"))
    # Without torch the WebUI itself is broken; choosing a bitsandbytes would be a guess.

    transformers = have.get("transformers")
    req, low, below = diffusers_choice(transformers)
    diffusers = have.get("diffusers")
    why = f"transformers {transformers}" if transformers else "no transformers installed"
    if diffusers is None:
        plan.append((req, f"missing; fits {why}"))
    elif not _in_range(diffusers, low, below):
        plan.append((req, f"{diffusers} does not import with {why}"))

    req, low, below = LYCORIS
    lycoris = have.get("lycoris-lora")
    if lycoris is None:
        plan.append((req, "missing; trains LoRA, LoCon, LoHa, LoKr"))
    elif not _in_range(lycoris, low, below):
        plan.append((req, f"{lycoris} is not the 4.1 API the LoRA training uses"))

    for name in ("prodigyopt", "ftfy", "regex", "tqdm"):
        if name not in have:
            plan.append((name, "missing"))
    if "onnxruntime" not in have and "onnxruntime-gpu" not in have:
        plan.append(("onnxruntime", "missing; runs the WD tagger captioners"))
    return plan


def constraints_text(installed: dict[str, str]) -> str:
    """Pins for every installed host package, e.g. 'torch==2.1.2+cu121' (pip matches the label)."""
    have = {normalize(k): v for k, v in installed.items()}
    return "".join(f"{name}=={have[name]}\n" for name in HOST_PACKAGES if name in have)


def _pip_error_summary(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip().startswith("ERROR:")]
    return lines[-1][len("ERROR:"):].strip() if lines else (message.strip().splitlines() or ["unknown error"])[-1]


def run(installed: dict[str, str] | None = None, launch_module=None) -> int:
    """Installs what ``plan_installs`` asks for; one line per package. Returns 0 always:
    a failing install.py is only reported by the WebUI, and the tab says what is missing."""
    installed = installed_versions() if installed is None else installed
    if launch_module is None:
        try:
            import launch as launch_module  # the WebUI's, on PYTHONPATH when the WebUI runs us
        except Exception:
            launch_module = None
    plan = plan_installs(installed, host_manages_bitsandbytes=host_manages_bitsandbytes(launch_module))
    if not plan:
        return 0
    if launch_module is None:
        reqs = " ".join(f'"{req}"' for req, _ in plan)
        print(f"{PREFIX} not running inside the WebUI; install these yourself: pip install {reqs}")
        return 0
    if getattr(getattr(launch_module, "args", None), "skip_install", False):
        return 0

    fd, constraints = tempfile.mkstemp(prefix="dreambooth-constraints-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf8") as f:
            f.write(constraints_text(installed))
        for i, (req, reason) in enumerate(plan):
            # run_pip prints "Installing <desc>": that is the one line per package.
            try:
                launch_module.run_pip(f'install "{req}" -c "{constraints}"', f"{req} for DreamBooth ({reason})")
            except Exception as e:  # run_pip raises RuntimeError carrying pip's output
                text = str(e)
                if _NETWORK_ERRORS.search(text):
                    left = ", ".join(r for r, _ in plan[i:])
                    print(f"{PREFIX} could not reach the package index (no network?): not installed: {left}. "
                          "The DreamBooth tab will say what is missing; restart the WebUI when online.", flush=True)
                    return 0
                print(f"{PREFIX} pip could not install {req}: {_pip_error_summary(text)}", flush=True)
    finally:
        try:
            os.remove(constraints)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(run())
