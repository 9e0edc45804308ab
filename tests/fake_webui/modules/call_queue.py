"""``modules/call_queue.py``: the lock every generation runs under."""
from __future__ import annotations

import html
import time
from functools import wraps

from modules import shared
from modules.fifo_lock import FIFOLock

queue_lock = FIFOLock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            res = func(*args, **kwargs)
        return res
    return f


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    @wraps(func)
    def f(*args, **kwargs):
        t = time.perf_counter()
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:  # the real one shows the error in the HTML output
            res = list(extra_outputs or [None]) + [f"<div class='error'>{html.escape(type(e).__name__ + ': ' + str(e))}</div>"]
        if add_stats and res:
            elapsed = time.perf_counter() - t
            res[-1] = (res[-1] or "") + f"<div class='performance'><p class='time'>Time taken: {elapsed:.2f} sec.</p></div>"
        return tuple(res)
    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    """Runs ``func`` under queue_lock; its outputs' last item is an HTML string. A first argument
    "task(...)" is the request's id: queued, started and finished in ``modules.progress``."""
    @wraps(func)
    def f(*args, **kwargs):
        from modules import progress

        id_task = args[0] if args and isinstance(args[0], str) and args[0].startswith("task(") else None
        if id_task:
            progress.add_task_to_queue(id_task)
        with queue_lock:
            shared.state.begin(job=id_task or "(unknown)")
            if id_task:
                progress.start_task(id_task)
            try:
                res = func(*args, **kwargs)
            finally:
                if id_task:
                    progress.finish_task(id_task)
                shared.state.end()
        return res
    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)
