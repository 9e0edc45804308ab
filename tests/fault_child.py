"""A training process for the fault-injection tests: ``python fault_child.py ARGS...`` runs
``python -m dreambooth ARGS...`` with every safetensors write slowed down after its bytes are out
(the temporary is complete but not yet renamed), announcing each as ``SLOW-WRITE <n> <path>`` on
stderr, so that the parent can kill it in the middle of a chosen export or resume-point write."""
from __future__ import annotations

import os
import sys
import time

import safetensors.torch

DELAY = float(os.environ.get("FAULT_WRITE_DELAY", "1.0"))
_real_save = safetensors.torch.save_file
_count = [0]


def slow_save(tensors, filename, metadata=None):
    _real_save(tensors, filename, metadata=metadata)
    _count[0] += 1
    print(f"SLOW-WRITE {_count[0]} {filename}", file=sys.stderr, flush=True)
    time.sleep(DELAY)


safetensors.torch.save_file = slow_save

if __name__ == "__main__":
    from dreambooth.__main__ import main

    sys.exit(main(sys.argv[1:]))
