"""The trainer, on Accelerate. `Trainer` is a built run and owns THE training step; `train()` is the loop.

`Trainer(cfg)` turns a Config into data, peer group, teachers, objective and optimizers; every user error
surfaces there, before anything is written. `Trainer.train_step(batches)` is the one implementation of a
training step: `train()` below, the benchmarks (`benchmarks/harness.py`) and the tests call it. `train()` runs
epochs of it, evaluates on the validation and test splits after each epoch, checkpoints atomically and ends
with summary.json; read it top to bottom.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object
from tqdm.auto import tqdm

from mutualkd import config as C
from mutualkd.data import BatchAugment, Splits, TrainBatchSampler, load_splits, make_train_loader
from mutualkd.engine import checkpoint
from mutualkd.engine.evaluate import evaluate
from mutualkd.engine.optim import build_optimizer, build_scheduler
from mutualkd.engine.report import select, table
from mutualkd.engine.tracking import MetricsLog, tracker_kwargs
from mutualkd.errors import UserError, first_line
from mutualkd.losses.base import BuildContext, UpdatePhase
from mutualkd.losses.objective import Objective
from mutualkd.peers import PeerGroup
from mutualkd.placement import Placement
from mutualkd.teachers import TeacherSet

PHASES = ("data", "forward", "losses", "backward", "optimizer")  # what `train_step` reports to its `mark`


def make_accelerator(cfg: C.Config, run_dir: Path | None = None) -> Accelerator:
    """A fresh Accelerator per run: Accelerate's process-wide state would otherwise pin the first run's
    precision for every later run in the same process (notebooks, sweeps). The distributed set-up stays."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    log_with, _ = tracker_kwargs(cfg, run_dir) if run_dir else ([], {})
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))]
    # a stage, or one peer's update of several, leaves parameters without gradient (FitNets' hint stage, DML
    # alternating)
    if cfg.objective.stages or any(t.updates_peers_in_turn for t in cfg.objective.terms):
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    acc = Accelerator(cpu=cfg.train.cpu, mixed_precision=cfg.train.mixed_precision, log_with=log_with or None,
                      project_dir=str(run_dir) if run_dir else None, kwargs_handlers=handlers)
    if acc.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals slow CPU convolutions down up to 40x
    return acc


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # ...without NaN-filling every new tensor (about 3 % of a CPU step, measured): nothing reads them unset
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False


@dataclasses.dataclass
class TrainState:
    """Where a run stands: everything a checkpoint holds besides module, optimizer and RNG states."""

    epoch: int = 0
    batch: int = 0  # micro-batches done in `epoch` (mid-epoch checkpoints)
    step: int = 0  # optimizer steps done
    history: list = dataclasses.field(default_factory=list)  # one evaluation record per epoch
    wall_time_s: float = 0.0  # seconds of training in earlier invocations of this run
    sums: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # logged values since the last line
    n_logged: int = 0  # forwards summed into `sums`


def _no_mark(phase: str) -> None:
    pass


class Trainer:
    """One run, built: accelerator, placement, data, peer group, teachers, objective, optimizers, state."""

    def __init__(self, cfg: C.Config, run_dir: Path | None = None, splits: Splits | None = None):
        """`run_dir`: where trackers write (none without); `splits`: already loaded data for `cfg.data`."""
        self.cfg, self.started = cfg, time.time()
        self.accelerator = acc = make_accelerator(cfg, run_dir)
        if acc.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise UserError(f"launch: {acc.distributed_type.name} is not supported yet (checkpoints and the peer "
                            "exchange assume whole parameters); launch plain multi-GPU (DDP), or spread peers over "
                            "GPUs with placement=peer_parallel")
        seed_everything(cfg.seed, cfg.train.deterministic)
        self.device, self.placement, P = acc.device, Placement(cfg.placement), len(cfg.peers)
        # data, peers, teachers, objective
        d = cfg.data
        self.splits = splits or load_splits(d)
        spec = self.splits.spec
        self.group = PeerGroup(cfg, spec.num_classes, spec.in_chans, spec.image_size,
                               local=self.placement.local_peers(P)).to(self.device)
        self.teachers = TeacherSet(cfg, spec).to(self.device) if cfg.teachers else None
        ctx = BuildContext(peer_names=cfg.peer_names, num_classes=spec.num_classes,
                           train_targets=torch.as_tensor(self.splits.train.targets),
                           embedding_dim=cfg.embedding.dim if cfg.embedding.head != "none" else None, seed=cfg.seed,
                           placement=self.placement, tap_shapes=self.group.tap_shapes, teachers=self.teachers,
                           input_shape=(spec.in_chans, *spec.image_size))
        self.objective = Objective(cfg.objective, ctx).to(self.device)
        self.augment = BatchAugment(spec, crop_padding=d.crop_padding if d.augment else 0,
                                    flip=(d.flip if d.flip is not None else spec.flip) and d.augment)
        # batches
        data_rank, data_size = self.placement.data_world()
        self.sampler = TrainBatchSampler(self.splits.train.targets, d.batch_size, seed=cfg.seed, kind=d.sampler,
                                         m=d.m_per_class, rank=data_rank, world_size=data_size)
        self.loader = make_train_loader(self.splits.train, self.sampler, d.num_workers)
        self.steps_per_epoch = math.ceil(len(self.sampler) / cfg.train.grad_accum)
        # optimizers: the peers' (with the loss adapters, averaged over ranks by hand), and the terms' own
        self.extras = self.objective.main_parameters()
        optimizer = build_optimizer(list(self.group.parameters()) + self.extras, cfg.train)
        self.scheduler = build_scheduler(optimizer, cfg.train, self.steps_per_epoch)
        if self.placement.peer_parallel:  # disjoint peers per rank: nothing to all-reduce, so no DDP wrapper
            self.model, self.optimizer = self.group, acc.prepare(optimizer)
        else:
            self.model, self.optimizer = acc.prepare(self.group, optimizer)
        if cfg.train.compile:  # evaluation keeps the eager module: its batch shapes vary
            self.model = torch.compile(self.model)
        self.aug_rng = torch.Generator(device=self.device)
        self.aug_rng.manual_seed(cfg.seed * 1_000_003 + data_rank)
        self.state = TrainState()

    # ----------------------------------------------------------------------------------- the step
    def epoch_batches(self) -> Iterator[list[dict]]:
        """The rest of the current epoch, as the micro-batches of one optimizer step at a time (grad_accum of
        them; the epoch's last group may be shorter)."""
        self.sampler.set_epoch(self.state.epoch)
        self.sampler.start_batch = self.state.batch
        group: list[dict] = []
        for i, batch in enumerate(self.loader, start=self.state.batch + 1):
            group.append(batch)
            if i % self.cfg.train.grad_accum == 0 or i == len(self.sampler):
                yield group
                group = []

    def train_step(self, batches: list[dict], mark: Callable[[str], None] = _no_mark) -> dict[str, torch.Tensor]:
        """One optimizer step over `batches` (the micro-batches of one accumulation group).

        Per micro-batch and peer update (one; one per peer with DML's alternating updates): forward (the peers,
        then the frozen teachers, once per micro-batch), the terms' own update phases (discriminators), the
        objective, backward; after the last micro-batch (after each peer update when alternating) the optimizer
        step. Then the lr schedule and the terms' after-step hooks (memory banks). `mark(phase)` is called as
        each of PHASES ends (the benchmark's timers). No host sync. Returns the step's logged values (means
        over its forwards, detached tensors); they are also summed into the state for the next log line.
        """
        s, acc, n = self.state, self.accelerator, len(batches)
        logs: dict[str, torch.Tensor] = {}
        forwards = 0
        for m, raw in enumerate(batches):
            epoch = s.epoch + (s.batch + m) / len(self.sampler)  # fractional: ramps and stages follow it
            batch = self.prepare(raw)
            mark("data")
            teach = None
            for live in self.objective.peer_updates(epoch):
                with self._sync(m == n - 1):
                    with acc.autocast():
                        out = self.placement.exchange(self.model(batch["input"], taps=self.objective.student_taps,
                                                                 live=live))
                        if teach is None:
                            teach = self.objective.teach(batch["input"], s.step, epoch)
                        mark("forward")
                        parts = {}
                        for label, phase in self.objective.active_phases(epoch):
                            parts.update(self.run_phase(label, phase, out, batch, teach))
                        losses = self.objective(out, batch, epoch, teach)
                        mark("losses")
                    acc.backward(losses["loss"] * self.placement.loss_scale() / n)  # outside autocast
                mark("backward")
                for k, v in {**losses["logs"], **parts}.items():
                    logs[k] = logs.get(k, 0.0) + v
                    s.sums[k] = s.sums.get(k, 0.0) + v
                s.n_logged, forwards = s.n_logged + 1, forwards + 1
                if m == n - 1:
                    self.optimizer_step()
                    mark("optimizer")
        self.scheduler.step()
        s.batch, s.step = s.batch + n, s.step + 1
        self.objective.after_step()
        mark("losses")
        return {k: v / forwards for k, v in logs.items()}

    def prepare(self, raw: dict) -> dict:
        """A loader batch on the device and augmented: target, index, and input (one tensor, or per-peer views)."""
        x = raw["image"].to(self.device, non_blocking=True)
        batch = {"target": raw["target"].to(self.device), "index": raw["index"].to(self.device)}
        if self.cfg.data.views == "per_peer":  # every peer's view is drawn on every rank; each runs its own
            views = self.augment.views(x, len(self.cfg.peers), self.aug_rng)
            batch["input"] = [views[p] for p in self.group.index]
        else:
            batch["input"] = self.augment(x, self.aug_rng, train=True)
        return batch

    def _sync(self, last: bool):
        """DDP all-reduces gradients only on an accumulation group's last micro-batch."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def run_phase(self, label: str, phase: UpdatePhase, out, batch: dict, teach) -> dict[str, torch.Tensor]:
        """A term's own update: its loss's gradient with respect to its optimizer's parameters only (nothing else
        accumulates a gradient), averaged over data-parallel ranks, then its optimizer step. Returns its logs."""
        parts = phase.loss(out, batch, teach)
        params = phase.parameters
        for p, g in zip(params, torch.autograd.grad(parts["loss"], params, allow_unused=True)):
            p.grad = g
        self.placement.average_grads(params)
        phase.optimizer.step()
        phase.optimizer.zero_grad(set_to_none=True)
        shown = {k: v for k, v in parts.items() if k != "loss"} or {phase.name: parts["loss"]}
        return {f"{label}/{k}": v.detach() for k, v in shown.items()}

    def optimizer_step(self) -> None:
        """The peers' optimizer step (with the loss adapters), after clipping; gradients cleared."""
        clip = self.cfg.train.clip_grad_norm
        self.placement.average_grads(self.extras)  # adapters live outside DDP
        if clip and self.placement.peer_parallel:
            self.accelerator.unscale_gradients()  # fp16: clip the true gradients
            self.placement.clip_grad_norm_(self.group.parameters(), clip)
        elif clip:
            self.accelerator.clip_grad_norm_(list(self.model.parameters()) + self.extras, clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------- logs, evaluation, state
    def mean_logs(self) -> dict[str, float]:
        """The logged values averaged over the interval and the ranks (one host sync), then reset; a NaN or inf
        on any rank stops every rank."""
        s = self.state
        if not s.n_logged:
            return {}
        local = torch.stack([torch.as_tensor(v, device=self.device) for v in s.sums.values()]) / s.n_logged
        means = dict(zip(s.sums, self.accelerator.reduce(local, reduction="mean").tolist()))
        s.sums, s.n_logged = {}, 0
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(f"training diverged: loss is {means['loss']} at step {s.step}; lower "
                                     "train.optimizer.lr or clip gradients (train.clip_grad_norm)")
        return means

    def settle(self) -> None:
        """Before an evaluation or a checkpoint: no diverged weights, and one set of BatchNorm statistics."""
        s = self.state
        if s.n_logged:  # check the pending interval for divergence, keeping it for its log line
            sums, n = dict(s.sums), s.n_logged
            self.mean_logs()
            s.sums, s.n_logged = sums, n
        self.placement.average_buffers(self.group)
        self.placement.average_buffers(self.objective)

    def evaluate(self) -> dict:
        """Per-peer and ensemble accuracy on the test split and, if there is one, the validation split."""
        d, P = self.cfg.data, len(self.cfg.peers)
        splits = {"test": self.splits.test, "val": self.splits.val}
        return {name: evaluate(self.group, split, self.augment, self.accelerator, self.placement, d.eval_batch_size,
                               P, d.num_workers) for name, split in splits.items() if split is not None}

    def wall(self) -> float:
        """Seconds of training over every invocation of this run."""
        return self.state.wall_time_s + time.time() - self.started

    def save(self, path: Path) -> None:
        """Gather every rank's state (collective), then rank 0 writes one atomic file.

        Per rank: global RNGs, the augmentation stream, the objective's samplers and, under peer_parallel, its own
        optimizer; the peers of every rank under single-process names; the replicated state (the peer group under
        data_parallel, memory banks, loss adapters, discriminators) is checked to be identical on every rank.
        """
        pp, s, acc = self.placement.peer_parallel, self.state, self.accelerator
        own = {"optimizer": self.optimizer.optimizer.state_dict()} if pp else {}
        models = gather_object([_cpu(self.group.global_state_dict())]) if pp else [self.group.state_dict()]
        replicated = dict(self.objective.state_dict())  # keys terms.*; the group's under group.*
        if not pp:
            replicated.update({f"group.{k}": v for k, v in self.group.state_dict().items()})
        ranks = gather_object([{**own, "rng": checkpoint.rng_state(), "aug_rng": self.aug_rng.get_state(),
                                "objective": {k: v for k, v in self.objective.state_dict().items()
                                              if k.endswith("_extra_state")},
                                "state_sums": {k: v.double().sum().item() for k, v in replicated.items()
                                               if isinstance(v, torch.Tensor) and v.is_floating_point()}}])
        if not acc.is_main_process:
            return
        if any(r["state_sums"] != ranks[0]["state_sums"] for r in ranks):
            differ = sorted(k for k in ranks[0]["state_sums"] if any(r["state_sums"].get(k) != ranks[0]["state_sums"][k]
                                                                     for r in ranks))
            raise RuntimeError(f"replicated state differs across ranks: {', '.join(differ[:5])}")
        payload = {"ranks": ranks, "config": C.dump(self.cfg), "model": {k: v for m in models for k, v in m.items()},
                   "objective": self.objective.state_dict(),
                   "optimizer": None if pp else self.optimizer.optimizer.state_dict(),
                   "phases": {f"{label}/{p.name}": p.optimizer.state_dict() for label, p in self.objective.phases},
                   "scheduler": self.scheduler.state_dict(), "epoch": s.epoch, "batch": s.batch, "step": s.step,
                   "history": json.dumps(s.history), "log_sums": {k: _cpu_tensor(v) for k, v in s.sums.items()},
                   "n_logged": s.n_logged, "data_spec": dataclasses.asdict(self.splits.spec),
                   "wall_time_s": self.wall(),
                   "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None}
        checkpoint.save(payload, path)

    def restore(self, path: Path) -> None:
        """Load a checkpoint into this built run (this rank's share of it), state included."""
        state, acc = checkpoint.load(path), self.accelerator
        if len(state["ranks"]) != acc.num_processes:
            raise UserError(f"--resume: the checkpoint was written by {len(state['ranks'])} processes; "
                            f"resume with the same number (this launch has {acc.num_processes})")
        local = state["ranks"][acc.process_index]
        try:
            self.group.load_global_state_dict(state["model"])
            self.objective.load_state_dict(state["objective"])
            self.objective.load_state_dict(local["objective"], strict=False)  # this rank's samplers
            self.optimizer.optimizer.load_state_dict(local["optimizer"] if self.placement.peer_parallel
                                                     else state["optimizer"])
            for label, phase in self.objective.phases:
                phase.optimizer.load_state_dict(state["phases"][f"{label}/{phase.name}"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(f"--resume: {path} does not fit this config (peers, embedding or objective changed?): "
                            f"{first_line(err, 200)}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if acc.scaler is not None and state.get("grad_scaler"):
            acc.scaler.load_state_dict(state["grad_scaler"])
        checkpoint.set_rng_state(local["rng"])
        self.aug_rng.set_state(local["aug_rng"])
        self.state = TrainState(state["epoch"], state["batch"], state["step"], json.loads(state["history"]),
                                state["wall_time_s"], {k: v.to(self.device) for k, v in state["log_sums"].items()},
                                state["n_logged"])

    def summary(self) -> dict:
        """The run's results: final and validation-selected test accuracy per peer and for the ensemble."""
        cfg = self.cfg
        counts = dict(gather_object(list(zip(self.group.index, self.group.param_counts()))))
        rows = select(self.state.history, cfg.peer_names)
        peers = [{"name": n, "arch": p.arch, "params": counts[i], **rows[n]}
                 for i, (n, p) in enumerate(zip(cfg.peer_names, cfg.peers))]
        world = self.accelerator.num_processes
        return {"peers": peers, "ensemble": {"name": "ensemble", **rows["ensemble"]}, "epochs": self.state.epoch,
                "wall_time_s": self.wall(), "seed": cfg.seed, "topology": cfg.topology.kind, "world_size": world,
                "global_batch": cfg.data.batch_size * (world if cfg.placement == "data_parallel" else 1),
                "placement": cfg.placement, "dataset": cfg.data.name,
                "selection": "per model, best validation top-1 (latest epoch on ties); never test"}


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def _cpu_tensor(v) -> torch.Tensor:
    return torch.as_tensor(v).detach().cpu()


def train(cfg: C.Config, run_dir: Path, resume: bool = False) -> dict | None:
    """Train the peer group; returns the summary (None when stopped early by train.max_steps)."""
    t = Trainer(cfg, run_dir)
    main, s, ckpt = t.accelerator.is_main_process, t.state, run_dir / "checkpoints"
    if main and not resume:  # every user error has surfaced by now: the run directory starts here
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(C.dump(cfg))
    log = MetricsLog(run_dir, t.accelerator, cfg, active=main)
    if resume:
        t.restore(ckpt / "last.pt")
        s = t.state
        log.wall_before = s.wall_time_s
        log.truncate_after(s.step)
    bar = tqdm(total=cfg.train.epochs * t.steps_per_epoch, initial=s.step, disable=not (main and cfg.train.progress),
               desc="train", dynamic_ncols=True)
    t.model.train()
    while s.epoch < cfg.train.epochs:
        # ---- one epoch of optimizer steps
        for batches in t.epoch_batches():
            t.train_step(batches)
            bar.update(1)
            if s.step % cfg.train.log_every == 0:  # the only host sync of the loop, once per interval
                means = t.mean_logs()
                log.write({"epoch": s.epoch + s.batch / len(t.sampler), "lr": t.scheduler.get_last_lr()[0],
                           "train": means}, s.step)
                bar.set_postfix(loss=f"{means['loss']:.3f}")
            if cfg.train.max_steps and s.step >= cfg.train.max_steps:
                t.settle()
                t.save(ckpt / "last.pt")
                bar.close()
                log.close()
                if main:
                    print(f"stopped at step {s.step} (train.max_steps); continue with: "
                          f"mutualkd train --resume {run_dir}")
                return None
        s.epoch, s.batch = s.epoch + 1, 0
        # ---- evaluate (validation selects, test never does), checkpoint, keep the best
        t.settle()
        record = {"epoch": s.epoch, **t.evaluate()}
        best_before = max((_val_metric(h) for h in s.history if h.get("val")), default=-1.0)
        s.history.append(record)
        log.write({"epoch": s.epoch, "eval": record}, s.step)
        t.save(ckpt / "last.pt")
        if main and "val" in record and _val_metric(record) >= best_before:
            checkpoint.copy(ckpt / "last.pt", ckpt / "best.pt")
        if main:
            bar.write(f"epoch {s.epoch}: test top-1 " + " ".join(f"{n}={a:.2f}" for n, a in
                      zip(cfg.peer_names, record["test"]["top1"])) + f" ensemble={record['test']['ensemble_top1']:.2f}")
    bar.close()
    summary = t.summary()
    log.close()
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(table(summary))
    return summary


def _val_metric(record: dict) -> float:
    """What selects `best.pt`: the peers' mean validation top-1."""
    return sum(record["val"]["top1"]) / len(record["val"]["top1"])
