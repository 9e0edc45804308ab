"""The host-memory test's process: two training runs of the ``small`` model through the same path
the tab uses (service.start_training in a job thread), the process's resident memory measured
around the second one, printed as one JSON line. A process of its own, so that nothing the test
session did before counts. ``python memory_child.py FOLDER``."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository
    from dreambooth.app import service
    from dreambooth.models import tiny
    from dreambooth.common.config import Concept, TrainingConfig
    from dreambooth.app.demo import draw_pictures
    from dreambooth.app.job import JobRunner
    from dreambooth.host import StandaloneHost

    models = folder / "models"
    (models / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    base = tiny.save_checkpoint(models / "Stable-diffusion" / "small-base.safetensors", size="small")
    draw_pictures(folder / "pics", count=3, size=64, seed=1)
    host, runner = StandaloneHost(models), JobRunner()

    def run(name: str) -> dict:
        config = TrainingConfig(
            base_model=str(base), model_name=name, resolution=64, max_train_steps=3,
            concepts=[Concept(instance_data_dir=str(folder / "pics"),
                              instance_prompt="photo of ohwx toy")],
            with_prior_preservation=False, train_text_encoder=True, optimizer="adamw",
            learning_rate=1e-4, mixed_precision="no", gradient_checkpointing=False,
            checkpoint_every_n_steps=0, sample_every_n_steps=0, export_dtype="fp32")
        with PeakSampler() as peak:
            service.start_training(config, host, runner)
            snap = runner.wait(600)
        if snap.phase != "done":
            raise SystemExit(f"run {name} ended as {snap.phase}: {snap.error}")
        return {"peak_kib": peak.kib}

    run("warm-up")  # imports, thread pools, allocator arenas: what any first run leaves
    before = rss_kib()
    second = run("measured")
    after = rss_kib()

    # The export alone, from components in memory (as at the end of a run).
    from dreambooth.models import checkpoint, export

    components, _ = checkpoint.load_components(base)
    trained = sum(p.numel() for m in (components.unet, components.text_encoder)
                  for p in m.parameters())
    export_before, export_anon_before = rss_kib(), rss_kib("RssAnon")
    with PeakSampler() as export_peak, PeakSampler("RssAnon") as export_anon_peak:
        export.export_checkpoint(base, components, folder / "export.safetensors", dtype="fp32")
    print(json.dumps({"before_kib": before, "peak_kib": second["peak_kib"], "after_kib": after,
                      "hwm_kib": rss_kib("VmHWM"), "base_bytes": base.stat().st_size,
                      "trained_params": trained, "export_before_kib": export_before,
                      "export_peak_kib": export_peak.kib, "export_anon_before_kib":
                      export_anon_before, "export_anon_peak_kib": export_anon_peak.kib}))


class PeakSampler:
    """The highest ``field`` of /proc/self/status while the block runs, sampled every 5 ms (VmHWM
    cannot be reset). RssAnon is the process's own memory; VmRSS adds the pages of mapped files
    (safetensors reads through mmap), which the kernel can drop whenever it needs the room."""

    def __init__(self, field: str = "VmRSS"):
        self.field = field

    def __enter__(self) -> "PeakSampler":
        self.kib, self._done = rss_kib(self.field), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.kib = max(self.kib, rss_kib(self.field))
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.kib = max(self.kib, rss_kib(self.field))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
