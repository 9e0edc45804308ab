"""``modules/progress.py``: which generation requests wait, which runs, and what
``/internal/progress`` answers for one of them (the text is made here, on the server)."""
from __future__ import annotations

import time
from collections import OrderedDict

from modules import shared

current_task = None
pending_tasks: OrderedDict = OrderedDict()
finished_tasks: list = []


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()


def start_task(id_task):
    global current_task
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
    if len(finished_tasks) > 16:
        finished_tasks.pop(0)


def progressapi(id_task):
    """What ``POST /internal/progress {"id_task": ...}`` returns (as a dict)."""
    active = id_task == current_task
    queued = id_task in pending_tasks
    completed = id_task in finished_tasks
    if not active:
        textinfo = "Waiting..."
        if queued:
            ordered = sorted(pending_tasks.keys(), key=lambda x: pending_tasks[x])
            textinfo = f"In queue: {ordered.index(id_task) + 1}/{len(ordered)}"
        return {"active": active, "queued": queued, "completed": completed, "progress": None,
                "eta": None, "textinfo": textinfo}
    state = shared.state
    progress = 0.0
    if state.job_count > 0:
        progress += state.job_no / state.job_count
    if state.sampling_steps > 0 and state.job_count > 0:
        progress += 1 / state.job_count * state.sampling_step / state.sampling_steps
    return {"active": True, "queued": False, "completed": False, "progress": min(progress, 1),
            "eta": None, "textinfo": state.textinfo}
