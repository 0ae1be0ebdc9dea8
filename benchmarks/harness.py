"""Measure one scenario: images/s, step-time breakdown, peak memory and the peer-group overhead ratio.

One training step is `mutualkd.engine.trainer.Trainer.train_step`, the trainer's own step (what `mutualkd
train` runs), on a `Trainer` built from the scenario's config; its phase hooks mark the timer:

    data       next batch from the loader, host-to-device copy, batched augmentation
    forward    the peer group's forward (placement exchange included) and the frozen teachers' forward
    losses     the terms' own update phases (discriminators: loss, backward, step), the objective and the
               log accumulation, and the after-step hooks (memory-bank updates), whose time is added here
    backward   accelerator.backward(loss)
    optimizer  gradient averaging of the loss adapters, clipping, optimizer.step(), zero_grad; the lr
               schedule's step is added to `losses` with the after-step hooks

With DML's alternating updates a step has one forward / losses / backward / optimizer per peer; each phase's
pieces add up. Not included: the metric flush every `train.log_every` steps (one host sync), progress bar,
checkpoints, evaluation.

The single-model baseline for a peer is the same step with that peer alone (topology independent, no
projection head) and only the `ce` term: same arch, batch, data, optimizer and schedule. Group and
single-model runs alternate in rounds (the order flips every round) so that machine noise hits both;
the overhead ratio is median(group step) / sum over peers of median(single step), medians over rounds.

Timers: time.perf_counter on CPU; on CUDA, CUDA events recorded at the phase boundaries and one
synchronize at the end of each step (never inside the engine). Memory: on CUDA,
torch.cuda.max_memory_allocated; on CPU, resident set size sampled by a background thread from
/proc/self/statm (psutil where /proc is missing), plus the process-lifetime peak from getrusage.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

PHASES = ("data", "forward", "losses", "backward", "optimizer")


# ------------------------------------------------------------------------------------------ machine
def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.is_available(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        info["cpu_model"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class CpuNoise:
    """How busy the machine was with OTHER processes over a section: (all CPUs' busy time from /proc/stat
    minus this process's CPU time) / (wall time x CPUs). Near 0 on a quiet machine."""

    def __init__(self):
        self.t0 = self.busy0 = self.own0 = None

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy_s(), self._own_s()

    def stop(self) -> float | None:
        busy = self._busy_s()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        foreign = (busy - self.busy0) - (self._own_s() - self.own0)
        return max(0.0, foreign / (wall * (os.cpu_count() or 1)))


# ------------------------------------------------------------------------------------------- timing
class StepTimer:
    """Phase marks within one step. `start()`, then `mark(phase)` at the end of each phase (a phase may be
    marked several times; its pieces add up), then `finish()` -> {phase: ms, "step": ms}.

    CPU: perf_counter. CUDA: events recorded on the current stream, resolved after one synchronize of the
    last event, so the step runs asynchronously until its end and the engine is never synchronized."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [("start", self._now())]

    def mark(self, phase: str) -> None:
        self.marks.append((phase, self._now()))

    def finish(self) -> dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
            elapsed = lambda a, b: a.elapsed_time(b)  # noqa: E731  (ms)
        else:
            elapsed = lambda a, b: (b - a) * 1e3  # noqa: E731
        out = dict.fromkeys(PHASES, 0.0)
        for (_, a), (phase, b) in zip(self.marks, self.marks[1:]):
            out[phase] += elapsed(a, b)
        out["step"] = elapsed(self.marks[0][1], self.marks[-1][1])
        return out


# ------------------------------------------------------------------------------------------- memory
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return None


def lifetime_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (VmHWM; Linux >= 4.0). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


class MemoryMonitor:
    """Peak memory over the sections between `start()` and `stop()` (several sections accumulate).

    CPU, Linux: the kernel's own peak resident set size (VmHWM), reset through /proc/self/clear_refs at each
    `start()` and read at `stop()`: exact, no sampling, nothing running beside the step. Elsewhere on CPU:
    RSS sampled every `interval_s` by a daemon thread (psutil or /proc/self/statm). CUDA:
    torch.cuda.max_memory_allocated, reset at each `start()`."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.cuda = device.type == "cuda"
        self.device = device
        self.interval_s = interval_s
        self.hwm = not self.cuda and reset_peak_rss()
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated, reset before each group section"
        if self.hwm:
            return ("kernel peak RSS (VmHWM in /proc/self/status), reset via /proc/self/clear_refs before each "
                    "group section and read after it")
        return f"resident set size sampled every {self.interval_s * 1e3:g} ms by a background thread"

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return current_rss_bytes() or 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = current_rss_bytes() or 0
            if rss > self.peak:
                self.peak = rss
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.hwm:
            reset_peak_rss()
        else:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return
        if self.hwm:
            self.peak = max(self.peak, (_status_kb("VmHWM") or 0) * 1024)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss_bytes() or 0)


# ------------------------------------------------------------------------------------------ runners
def single_model_config(cfg, peer: int):
    """The baseline for peer `peer`: that peer alone, independent, no head, no teachers, only the `ce` term."""
    from mutualkd.config import validate

    tree = cfg.model_dump(mode="python")
    tree["peers"] = [tree["peers"][peer]]
    tree["topology"] = {"kind": "independent"}
    tree["embedding"] = {**tree["embedding"], "head": "none"}
    ce = [t for t in tree["objective"]["terms"] if t["name"] == "ce"]
    tree["objective"] = {"terms": ce[:1] or [{"name": "ce"}]}
    tree["data"]["views"] = "shared"
    tree["teachers"], tree["teacher_policy"] = [], {}
    return validate(tree, source=f"single-model baseline of peer {peer}")


def _data_key(cfg) -> dict:
    d = cfg.data.model_dump(mode="json")
    d.pop("views")
    return d


@dataclass
class Runner:
    """One trainable set-up (a peer group or a single model): a `Trainer` and its own data stream."""

    label: str
    cfg: object
    share_data_with: Runner | None = None  # reuse that runner's datasets when the data config is the same
    trainer: object = None
    steps_done: int = 0
    records: list[dict] = field(default_factory=list)

    def __post_init__(self):
        from mutualkd.engine.trainer import Trainer

        other = self.share_data_with
        same = other is not None and _data_key(other.cfg) == _data_key(self.cfg)
        # same seed, same images: one copy of the data (memory figures stay clean)
        self.trainer = Trainer(self.cfg, splits=other.trainer.splits if same else None)
        self.accelerator, self.device = self.trainer.accelerator, self.trainer.device
        self.trainer.model.train()
        self._batches = self.trainer.epoch_batches()

    def _next_batches(self) -> list[dict]:
        try:
            return next(self._batches)
        except StopIteration:  # the epoch is over: the next one (no evaluation here)
            state = self.trainer.state
            state.epoch, state.batch = state.epoch + 1, 0
            self._batches = self.trainer.epoch_batches()
            return next(self._batches)

    def step(self, timer: StepTimer) -> dict[str, float]:
        """One optimizer step of the trainer (`Trainer.train_step`), timed phase by phase."""
        timer.start()
        logs = self.trainer.train_step(self._next_batches(), mark=timer.mark)
        rec = timer.finish()
        self.steps_done += 1
        self.last_loss = logs["loss"]
        state = self.trainer.state
        if state.step % self.cfg.train.log_every == 0:  # the loop's (host-syncing) log flush; not timed
            state.sums, state.n_logged = {}, 0
        return rec

    def run(self, n: int, timer: StepTimer, round_index: int | None) -> None:
        for _ in range(n):
            rec = self.step(timer)
            if round_index is not None:
                rec["round"] = round_index
                self.records.append(rec)

    def loss_is_finite(self) -> bool:
        return self.steps_done == 0 or math.isfinite(float(self.last_loss))


# ------------------------------------------------------------------------------------------ stats
def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _step_stats(records: list[dict], rounds: int) -> dict:
    steps = [r["step"] for r in records]
    per_round = [statistics.median([r["step"] for r in records if r["round"] == k]) for k in range(rounds)]
    return {
        "median": statistics.median(per_round),  # the median over rounds of each round's median
        "p10": _quantile(steps, 0.1),
        "p90": _quantile(steps, 0.9),
        "median_all_steps": statistics.median(steps),
        "mean": statistics.fmean(steps),
        "per_round_median": per_round,
        "n_steps": len(steps),
    }


def _breakdown(records: list[dict]) -> dict[str, float]:
    return {p: statistics.median([r[p] for r in records]) for p in PHASES}


def _mb(nbytes: int | float | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**20, 1)


# ------------------------------------------------------------------------------------------ scenario
def resolve_config(config_path: str | None, overrides: list[str], batch_size: int | None, device: str | None):
    from mutualkd.config import load_config

    extra = []
    if batch_size is not None:
        extra.append(f"data.batch_size={batch_size}")
    if device == "cpu":
        extra.append("train.cpu=true")
    return load_config(config_path, list(overrides) + extra), list(overrides) + extra


def run_scenario(name: str, overrides: list[str], config_path: str | None = None, *, steps: int = 10,
                 warmup: int = 3, rounds: int = 5, batch_size: int | None = None, threads: int | None = None,
                 device: str | None = None, dedup_singles: bool = True, description: str = "",
                 log=None) -> dict:
    """Measure one scenario in this process and return its result record (JSON-ready)."""
    if steps < 1 or rounds < 1 or warmup < 0:
        raise ValueError("steps and rounds must be >= 1, warmup >= 0")
    say = log or (lambda *_: None)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        t_build = time.perf_counter()
        cfg, all_overrides = resolve_config(config_path, overrides, batch_size, device)
        group = Runner("group", cfg)
        accelerator, dev = group.accelerator, group.device
        # one baseline per distinct (arch, kwargs, pretrained) unless asked to measure every peer separately
        keys = [(p.arch, tuple(sorted(p.model_kwargs.items())), p.pretrained) for p in cfg.peers]
        owners: list[int] = []  # peer index -> index into singles
        singles: list[Runner] = []
        first_of: dict = {}
        for i, key in enumerate(keys):
            if dedup_singles and key in first_of:
                owners.append(first_of[key])
                continue
            first_of.setdefault(key, len(singles))
            owners.append(len(singles))
            singles.append(Runner(f"single:{cfg.peers[i].name}", single_model_config(cfg, i), group))
        build_s = time.perf_counter() - t_build
        build_peak = lifetime_peak_rss_bytes() if dev.type == "cpu" else None  # before any VmHWM reset
        gc.collect()
        timer = StepTimer(dev)
        mem = MemoryMonitor(dev)
        single_mem = MemoryMonitor(dev)
        base = mem.current()
        say(f"[{name}] built in {build_s:.1f} s on {dev}; warm-up {warmup} steps")

        mem.start()
        group.run(warmup, timer, None)
        mem.stop()
        single_mem.start()
        for s in singles:
            s.run(warmup, timer, None)
        single_mem.stop()
        t_meas = time.perf_counter()
        noise = CpuNoise()
        noise.start()
        for r in range(rounds):
            order = ["group", "singles"] if r % 2 == 0 else ["singles", "group"]
            for what in order:
                if what == "group":
                    mem.start()
                    group.run(steps, timer, r)
                    mem.stop()
                else:
                    single_mem.start()
                    for s in singles:
                        s.run(steps, timer, r)
                    single_mem.stop()
            g = statistics.median(x["step"] for x in group.records if x["round"] == r)
            say(f"[{name}] round {r + 1}/{rounds}: group {g:.1f} ms/step")
        measure_s = time.perf_counter() - t_meas
        foreign = noise.stop()

        gstats = _step_stats(group.records, rounds)
        sstats = [_step_stats(s.records, rounds) for s in singles]
        per_peer_single = [sstats[owners[i]]["median"] for i in range(len(cfg.peers))]
        # per-round ratio: each round's group median over the same round's single-model sum
        round_ratios = [
            gstats["per_round_median"][r] / sum(sstats[owners[i]]["per_round_median"][r] for i in range(len(owners)))
            for r in range(rounds)
        ]
        B = cfg.data.batch_size * accelerator.num_processes
        breakdown = _breakdown(group.records)
        result = {
            "scenario": name,
            "description": description,
            "config_file": config_path,
            "overrides": all_overrides,
            "resolved_config": cfg.model_dump(mode="json"),
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "flush_denormal": dev.type == "cpu",
            "deterministic": cfg.train.deterministic,
            "mixed_precision": cfg.train.mixed_precision,
            "batch": B,
            "P": len(cfg.peers),
            "archs": [p.arch for p in cfg.peers],
            "topology": cfg.topology.kind,
            "terms": [t.name for t in cfg.objective.terms],
            "steps_per_round": steps,
            "warmup_steps": warmup,
            "rounds": rounds,
            "images_per_s": B * 1e3 / gstats["median"],
            "step_ms": gstats,
            "breakdown_ms": breakdown,
            "breakdown_sum_ms": sum(breakdown.values()),
            "peak_mem_mb": _mb(mem.peak),  # absolute peak during the group's steps (RSS on CPU)
            "peak_mem_increase_mb": _mb(mem.peak - base),  # over the state just before the first step
            "mem_before_steps_mb": _mb(base),
            "build_peak_rss_mb": _mb(build_peak),
            "process_peak_rss_mb": _mb(max(build_peak, mem.peak, single_mem.peak)) if build_peak else None,
            "single_models_peak_mem_mb": _mb(single_mem.peak),
            "memory_method": mem.method + ("; peak_mem_mb is absolute (runtime, data, models, banks included), "
                                           "peak_mem_increase_mb is over the resident size just before the "
                                           "first step; build_peak_rss_mb: getrusage ru_maxrss at the end of "
                                           "building (synthetic data generation included); process_peak_rss_mb: "
                                           "the largest of all three"
                                           if dev.type == "cpu" else ""),
            "single_model_step_ms": {cfg.peers[i].name: per_peer_single[i] for i in range(len(cfg.peers))},
            "single_models": [
                {"label": s.label, "arch": s.cfg.peers[0].arch, "step_ms": st, "images_per_s": B * 1e3 / st["median"],
                 "breakdown_ms": _breakdown(s.records),
                 "peers": [cfg.peers[i].name for i in range(len(owners)) if owners[i] == k]}
                for k, (s, st) in enumerate(zip(singles, sstats))
            ],
            "single_models_deduplicated": dedup_singles,
            "single_model_sum_ms": sum(per_peer_single),
            "overhead_ratio": gstats["median"] / sum(per_peer_single),
            "overhead_ratio_per_round": round_ratios,
            "losses_finite": group.loss_is_finite(),
            "other_processes_cpu_fraction": foreign,  # busy time of other processes / (wall x CPUs)
            "build_s": build_s,
            "measure_s": measure_s,
            "machine": machine_info(),
        }
        return result
    finally:
        torch.set_num_threads(old_threads)


# ------------------------------------------------------------------------------------------ report
def format_table(results: list[dict]) -> str:
    head = ["scenario", "dev", "thr", "B", "P", "img/s", "step ms med [p10-p90]", "data", "fwd", "loss", "bwd",
            "opt", "single sum", "ratio", "peak MB (+inc)"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["scenario"], "-", "-", "-", "-", "-", f"ERROR: {r['error'][:60]}"] + [""] * 8)
            continue
        s, bd = r["step_ms"], r["breakdown_ms"]
        rows.append([
            r["scenario"], r["device"], str(r["threads"]), str(r["batch"]), str(r["P"]), f"{r['images_per_s']:.0f}",
            f"{s['median']:.0f} [{s['p10']:.0f}-{s['p90']:.0f}]",
            *(f"{bd[p]:.0f}" for p in PHASES),
            f"{r['single_model_sum_ms']:.0f}", f"{r['overhead_ratio']:.3f}",
            f"{r['peak_mem_mb']:.0f} (+{r['peak_mem_increase_mb']:.0f})",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


# ------------------------------------------------------------------------------------------ profile
def profile_scenario(name: str, overrides: list[str], config_path: str | None = None, *, steps: int = 5,
                     warmup: int = 3, batch_size: int | None = None, threads: int | None = None,
                     device: str | None = None, rows: int = 15, description: str = "") -> str:
    """torch.profiler over `steps` group steps (after `warmup`): the top ops by self CPU time, as text."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cfg, all_overrides = resolve_config(config_path, overrides, batch_size, device)
        group = Runner("group", cfg)
        dev = group.device
        timer = StepTimer(dev)
        group.run(warmup, timer, None)
        group.records = []
        unprofiled = []
        for _ in range(steps):  # the same steps without the profiler, for comparison with its overhead
            unprofiled.append(group.step(timer)["step"])
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch_profile(activities=activities, record_shapes=False) as prof:
            group.run(steps, timer, 0)
        sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        bd = _breakdown(group.records)
        med = statistics.median(r["step"] for r in group.records)
        header = [
            f"# profile of scenario {name}: {description}",
            f"# device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch "
            f"{cfg.data.batch_size}, P {len(cfg.peers)}, {steps} profiled steps after {warmup} warm-up steps",
            f"# machine load average at the end: {os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}",
            f"# config {config_path or '(schema defaults)'} + overrides: {' '.join(all_overrides)}",
            f"# step median without the profiler {statistics.median(unprofiled):.1f} ms; under the profiler "
            f"{med:.1f} ms; phases under the profiler (median ms): "
            + ", ".join(f"{p} {bd[p]:.1f}" for p in PHASES),
            "",
            f"top {rows} ops by self {'CUDA' if dev.type == 'cuda' else 'CPU'} time over the profiled steps:",
        ]
        table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48)
        return "\n".join(header) + "\n" + table
    finally:
        torch.set_num_threads(old_threads)
