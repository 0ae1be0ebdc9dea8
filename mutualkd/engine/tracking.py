"""Metrics: JSON lines in the run directory (always) and Accelerate's trackers (wandb, tensorboard).

A tracker that fails to start or to log is reported once and switched off; training goes on.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from mutualkd.config import Config


def tracker_kwargs(cfg: Config, run_dir: Path) -> tuple[list[str], dict]:
    """`log_with` and `init_kwargs` for the Accelerator, from `tracking`."""
    if cfg.tracking.backend == "none":
        return [], {}
    if cfg.tracking.backend == "wandb":
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        init = {"wandb": {"name": cfg.tracking.run_name or run_dir.name, "dir": str(run_dir),
                          "entity": cfg.tracking.entity, "tags": cfg.tracking.tags}}
        return ["wandb"], init
    return [cfg.tracking.backend], {}


class MetricsLog:
    """Appends one JSON object per record to metrics.jsonl and forwards it to the live trackers."""

    def __init__(self, run_dir: Path, accelerator, cfg: Config, active: bool):
        self.path = run_dir / "metrics.jsonl"
        self.accelerator = accelerator
        self.active = active  # main process only
        self.trackers_on = False
        self.clock = time.time()
        self.wall_before = 0.0  # seconds spent by earlier invocations of a resumed run
        if active and cfg.tracking.backend != "none":
            _, init = tracker_kwargs(cfg, run_dir)
            try:
                accelerator.init_trackers(cfg.tracking.project, config=cfg.model_dump(mode="json"), init_kwargs=init)
                self.trackers_on = True
            except Exception as err:  # a tracker must never stop training
                warnings.warn(f"tracking: {cfg.tracking.backend} failed to start, continuing without it: {err}",
                              stacklevel=2)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records the interrupted run wrote after its last checkpoint."""
        if not (self.active and self.path.exists()):
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict, step: int) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            wall = round(self.wall_before + time.time() - self.clock, 2)
            f.write(json.dumps({"step": step, "wall_time_s": wall, **record}) + "\n")
        if self.trackers_on:
            flat = {k: v for k, v in _flatten(record).items() if isinstance(v, (int, float))}
            try:
                self.accelerator.log(flat, step=step)
            except Exception as err:
                self.trackers_on = False
                warnings.warn(f"tracking: logging failed, continuing without the tracker: {err}", stacklevel=2)

    def close(self) -> None:
        """Finish the trackers (not `accelerator.end_training()`, which also tears down the process group)."""
        if self.trackers_on:
            for tracker in self.accelerator.trackers:
                try:
                    tracker.finish()
                except Exception as err:
                    warnings.warn(f"tracking: closing {tracker.name} failed: {err}", stacklevel=2)


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
