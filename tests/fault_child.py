"""A training process for the fault-injection tests: ``python fault_child.py ARGS...`` runs
``python -m dreambooth ARGS...`` with every safetensors write (resume points through
``safetensors.torch.save_file``, models through ``dreambooth.models.export.write_tensors``) slowed down
after its bytes are out
(the temporary is complete but not yet renamed), announcing each as ``SLOW-WRITE <n> <path>`` on
stderr, so that the parent can kill it in the middle of a chosen export or resume-point write."""
from __future__ import annotations

import os
import sys
import time

import safetensors.torch

from dreambooth.models import export

DELAY = float(os.environ.get("FAULT_WRITE_DELAY", "1.0"))
_real_save = safetensors.torch.save_file
_real_write = export.write_tensors
_count = [0]


def announce(filename) -> None:
    _count[0] += 1
    print(f"SLOW-WRITE {_count[0]} {filename}", file=sys.stderr, flush=True)
    time.sleep(DELAY)


def slow_save(tensors, filename, metadata=None):
    _real_save(tensors, filename, metadata=metadata)
    announce(filename)


def slow_write(tmp, fmt, layout, tensors, metadata):
    _real_write(tmp, fmt, layout, tensors, metadata)
    announce(tmp)


safetensors.torch.save_file = slow_save
export.write_tensors = slow_write

if __name__ == "__main__":
    from dreambooth.__main__ import main

    sys.exit(main(sys.argv[1:]))
