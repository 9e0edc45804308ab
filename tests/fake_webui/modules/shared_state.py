"""``shared.state``: what the WebUI's own progress bar (``/internal/progress``) reads."""
from __future__ import annotations

import time


class State:
    def __init__(self) -> None:
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.processing_has_refined_job_count = False
        self.job_timestamp = "0"
        self.sampling_step = 0
        self.sampling_steps = 0
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.textinfo = None
        self.time_start = None
        self.server_start = time.time()
        self.begun = 0  # fake only: how many times begin() ran

    def interrupt(self) -> None:
        self.interrupted = True

    def skip(self) -> None:
        self.skipped = True

    def begin(self, job: str = "(unknown)") -> None:
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job
        self.begun += 1

    def end(self) -> None:
        self.job = ""
        self.job_count = 0

    def assign_current_image(self, image) -> None:
        self.current_image = image
        self.id_live_preview += 1
