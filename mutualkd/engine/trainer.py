"""The training loop, on Accelerate: read it top to bottom.

build() turns a Config into data, peer group and objective (shared by train, eval and export);
train() runs epochs of synchronous peer updates, evaluates on the validation and test splits after each
epoch, checkpoints atomically, and ends with summary.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object
from tqdm.auto import tqdm

from mutualkd import config as C
from mutualkd import placement
from mutualkd.data import BatchAugment, Splits, TrainBatchSampler, load_configured, make_train_loader
from mutualkd.engine import checkpoint
from mutualkd.engine.evaluate import evaluate
from mutualkd.engine.optim import build_optimizer, build_scheduler
from mutualkd.engine.report import select, table
from mutualkd.engine.tracking import MetricsLog, tracker_kwargs
from mutualkd.errors import UserError, first_line
from mutualkd.losses.objective import BuildContext, Objective
from mutualkd.peers import PeerGroup
from mutualkd.teachers import TeacherSet


@dataclass
class Built:
    splits: Splits
    group: PeerGroup
    objective: Objective
    augment: BatchAugment
    teachers: TeacherSet | None = None


def make_accelerator(cfg: C.Config, run_dir: Path | None = None) -> Accelerator:
    """A fresh Accelerator per run: Accelerate's process-wide state would otherwise pin the first run's
    precision for every later run in the same process (notebooks, sweeps). The distributed set-up stays."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    log_with, _ = tracker_kwargs(cfg, run_dir) if run_dir else ([], {})
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))]
    if cfg.objective.stages:  # a stage may leave parts of the peers without gradient (FitNets' hint stage)
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


def build(cfg: C.Config, accelerator: Accelerator) -> Built:
    """Data, peers and objective from the config; every user error surfaces here, before training."""
    d = cfg.data
    splits = load_configured(d)
    spec = splits.spec
    placement.configure(cfg.placement)
    group = PeerGroup(cfg, spec.num_classes, spec.in_chans, spec.image_size,
                      local=placement.local_peers(len(cfg.peers)))
    teachers = TeacherSet(cfg, spec).to(accelerator.device) if cfg.teachers else None
    ctx = BuildContext(peer_names=cfg.peer_names, num_classes=spec.num_classes,
                       train_targets=torch.as_tensor(splits.train.targets),
                       embedding_dim=cfg.embedding.dim if cfg.embedding.head != "none" else None,
                       seed=cfg.seed, rank=placement.data_world()[0], tap_shapes=group.tap_shapes, teachers=teachers,
                       input_shape=(spec.in_chans, *spec.image_size))
    objective = Objective(cfg.objective, ctx)
    augment = BatchAugment(spec, crop_padding=d.crop_padding if d.augment else 0,
                           flip=(d.flip if d.flip is not None else spec.flip) and d.augment)
    return Built(splits, group.to(accelerator.device), objective.to(accelerator.device), augment, teachers)


def train(cfg: C.Config, run_dir: Path, resume: bool = False) -> dict | None:
    """Train the peer group; returns the summary (None when stopped early by train.max_steps)."""
    start_time = time.time()
    accelerator = make_accelerator(cfg, run_dir)
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise UserError(f"launch: {accelerator.distributed_type.name} is not supported yet (checkpoints and the peer "
                        "exchange assume whole parameters); launch plain multi-GPU (DDP), or spread peers over "
                        "GPUs with placement=peer_parallel")
    seed_everything(cfg.seed, cfg.train.deterministic)
    b = build(cfg, accelerator)
    device, main = accelerator.device, accelerator.is_main_process
    P, peer_parallel = len(cfg.peers), cfg.placement == "peer_parallel"
    data_rank, data_size = placement.data_world()

    sampler = TrainBatchSampler(b.splits.train.targets, cfg.data.batch_size, seed=cfg.seed, kind=cfg.data.sampler,
                                m=cfg.data.m_per_class, rank=data_rank, world_size=data_size)
    loader = make_train_loader(b.splits.train, sampler, cfg.data.num_workers)
    accum = cfg.train.grad_accum
    steps_per_epoch = math.ceil(len(sampler) / accum)
    if len(sampler) == 0:
        raise UserError(f"data.batch_size: {cfg.data.batch_size} x {data_size} processes exceeds "
                        f"the {len(b.splits.train)} training samples")
    extras = b.objective.main_parameters()  # loss adapters: trained with the peers, averaged over ranks by hand
    optimizer = build_optimizer(list(b.group.parameters()) + extras, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch)
    if peer_parallel:  # disjoint peers per rank: nothing to all-reduce, so no DDP wrapper
        group, optimizer = b.group, accelerator.prepare(optimizer)
    else:
        group, optimizer = accelerator.prepare(b.group, optimizer)
    if cfg.train.compile:  # evaluation keeps the eager module: its batch shapes vary
        group = torch.compile(group)
    aug_rng = torch.Generator(device=device)
    aug_rng.manual_seed(cfg.seed * 1_000_003 + data_rank)

    if main and not resume:  # every user error has surfaced by now: the run directory starts here
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(C.dump(cfg))
    ckpt_dir = run_dir / "checkpoints"
    log = MetricsLog(run_dir, accelerator, cfg, active=main)
    progress = restore(ckpt_dir / "last.pt", b, optimizer, scheduler, aug_rng, accelerator, peer_parallel) \
        if resume else Progress()
    epoch, skip, step, history, wall_before = (progress.epoch, progress.batch, progress.step, progress.history,
                                               progress.wall_time_s)
    if resume:
        log.wall_before = wall_before
        log.truncate_after(step)

    def wall() -> float:  # seconds of training over every invocation of this run
        return wall_before + time.time() - start_time

    def save(name: str, batch_in_epoch: int) -> None:  # collective: every rank calls it
        save_checkpoint(ckpt_dir / f"{name}.pt", cfg, b, optimizer, scheduler, aug_rng, accelerator,
                        Progress(epoch, batch_in_epoch, step, history, wall()))

    def settle() -> None:
        """Before an evaluation or a checkpoint: no diverged weights, and one set of BatchNorm statistics."""
        mean_checked(sums, n_logged)
        placement.average_buffers(b.group)
        placement.average_buffers(b.objective)

    def mean_checked(sums: dict, n: int) -> dict:
        """Losses averaged over the interval and the ranks (one host sync); a NaN/inf on any rank stops all."""
        if not n:
            return {}
        local = torch.stack([torch.as_tensor(v, device=device) for v in sums.values()]) / n
        means = dict(zip(sums, accelerator.reduce(local, reduction="mean").tolist()))
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(f"training diverged: loss is {means['loss']} at step {step} "
                                     f"(last complete checkpoint: {ckpt_dir / 'last.pt'})")
        return means

    def sel_metric(h: dict) -> float:  # the `best` checkpoint: mean validation top-1 of the peers
        return sum(h["val"]["top1"]) / P

    bar = tqdm(total=cfg.train.epochs * steps_per_epoch, initial=step, disable=not (main and cfg.train.progress),
               desc="train", dynamic_ncols=True)
    sums: dict[str, torch.Tensor] = {}
    n_logged = 0
    group.train()
    while epoch < cfg.train.epochs:
        sampler.set_epoch(epoch)
        sampler.start_batch = skip
        for i, batch in enumerate(loader, start=skip):
            sync = (i + 1) % accum == 0 or i + 1 == len(sampler)
            x = batch["image"].to(device, non_blocking=True)
            batch = {"target": batch["target"].to(device), "index": batch["index"].to(device)}
            if cfg.data.views == "per_peer":  # every peer's view is drawn on every rank; each runs its own
                views = b.augment.views(x, P, aug_rng)
                inputs = [views[p] for p in b.group.index]
            else:
                inputs = b.augment(x, aug_rng, train=True)
            batch["input"] = inputs  # the peers' normalised input(s): reconstruction targets
            progress_epoch = epoch + i / len(sampler)
            with contextlib.nullcontext() if sync else accelerator.no_sync(group), accelerator.autocast():
                out = placement.exchange(group(inputs, taps=b.objective.student_taps))
                teach = b.objective.teach(inputs, step, progress_epoch)
                losses = b.objective(out, batch, progress_epoch, teach)
            in_group = min(accum, len(sampler) - i // accum * accum)  # the epoch's last group may be short
            accelerator.backward(losses["loss"] * placement.loss_scale() / in_group)
            b.objective.after_backward()
            for k, v in losses["logs"].items():
                sums[k] = sums.get(k, 0.0) + v
            n_logged += 1
            if not sync:
                continue
            placement.average_grads(extras)
            if cfg.train.clip_grad_norm:
                if peer_parallel:
                    accelerator.unscale_gradients()  # fp16: clip the true gradients
                    placement.clip_grad_norm_(b.group.parameters(), cfg.train.clip_grad_norm)
                else:
                    accelerator.clip_grad_norm_(list(group.parameters()) + extras, cfg.train.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.train.log_every == 0:  # the only host sync of the step, once per interval
                means = mean_checked(sums, n_logged)
                log.write({"epoch": epoch + (i + 1) / len(sampler), "lr": scheduler.get_last_lr()[0],
                           "train": means}, step)
                bar.set_postfix(loss=f"{means['loss']:.3f}")
                sums, n_logged = {}, 0
            if cfg.train.max_steps and step >= cfg.train.max_steps:
                settle()
                save("last", i + 1)
                bar.close()
                log.close()
                if main:
                    print(f"stopped at step {step} (train.max_steps); continue with: mutualkd train --resume {run_dir}")
                return None
        skip = 0
        epoch += 1
        settle()
        record = {"epoch": epoch, "test": evaluate(b.group, b.splits.test, b.augment, accelerator,
                                                   cfg.data.eval_batch_size, P, cfg.data.num_workers)}
        if b.splits.val is not None:
            record["val"] = evaluate(b.group, b.splits.val, b.augment, accelerator, cfg.data.eval_batch_size, P,
                                     cfg.data.num_workers)
        best_before = max((sel_metric(h) for h in history if h.get("val")), default=-1.0)
        history.append(record)
        log.write({"epoch": epoch, "eval": record}, step)
        save("last", 0)
        if main and "val" in record and sel_metric(record) >= best_before:
            checkpoint.copy(ckpt_dir / "last.pt", ckpt_dir / "best.pt")
        if main:
            ens = record["test"]["ensemble_top1"]
            bar.write(f"epoch {epoch}: test top-1 " + " ".join(f"{n}={a:.2f}" for n, a in
                      zip(cfg.peer_names, record["test"]["top1"])) + f" ensemble={ens:.2f}")
    bar.close()
    counts = dict(gather_object(list(zip(b.group.index, b.group.param_counts()))))
    log.close()
    summary = summarize(cfg, [counts[p] for p in range(P)], history, wall(), accelerator.num_processes)
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(table(summary))
    return summary



@dataclass
class Progress:
    """Where a run stands: what a checkpoint holds besides module, optimizer and RNG states."""

    epoch: int = 0
    batch: int = 0  # micro-batches done in `epoch` (mid-epoch checkpoints)
    step: int = 0  # optimizer steps done
    history: list = dataclasses.field(default_factory=list)  # one evaluation record per epoch
    wall_time_s: float = 0.0


def save_checkpoint(path: Path, cfg, b: Built, optimizer, scheduler, aug_rng, accelerator, progress: Progress) -> None:
    """Gather every rank's state (collective), then rank 0 writes one atomic file.

    Per rank: global RNGs, the augmentation stream, the objective's samplers and, under peer_parallel, its own
    optimizer; the peers of every rank under single-process names; the objective's replicated state (memory
    banks, loss adapters, discriminators) is checked to be identical on every rank.
    """
    peer_parallel = cfg.placement == "peer_parallel"
    own = {"optimizer": optimizer.optimizer.state_dict()} if peer_parallel else {}
    models = gather_object([_cpu(b.group.global_state_dict())]) if peer_parallel else [b.group.state_dict()]
    ranks = gather_object([{**own, "rng": checkpoint.rng_state(), "aug_rng": aug_rng.get_state(),
                            "objective": {k: v for k, v in b.objective.state_dict().items() if k.endswith("_extra_state")},
                            "state_sums": {k: v.double().sum().item() for k, v in b.objective.state_dict().items()
                                           if isinstance(v, torch.Tensor) and v.is_floating_point()}}])
    if not accelerator.is_main_process:
        return
    if any(r["state_sums"] != ranks[0]["state_sums"] for r in ranks):
        raise RuntimeError(f"objective state differs across ranks: {[r['state_sums'] for r in ranks]}")
    payload = {"ranks": ranks, "config": C.dump(cfg), "model": {k: v for m in models for k, v in m.items()},
               "objective": b.objective.state_dict(),
               "optimizer": None if peer_parallel else optimizer.optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "epoch": progress.epoch, "batch": progress.batch,
               "step": progress.step, "history": json.dumps(progress.history),
               "data_spec": dataclasses.asdict(b.splits.spec), "wall_time_s": progress.wall_time_s,
               "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
    checkpoint.save(payload, path)


def restore(path: Path, b: Built, optimizer, scheduler, aug_rng, accelerator, peer_parallel: bool) -> Progress:
    """Load a checkpoint into the built run (this rank's share of it) and return where the run stood."""
    state = checkpoint.load(path)
    if len(state["ranks"]) != accelerator.num_processes:
        raise UserError(f"--resume: the checkpoint was written by {len(state['ranks'])} processes; "
                        f"resume with the same number (this launch has {accelerator.num_processes})")
    local = state["ranks"][accelerator.process_index]
    try:
        b.group.load_global_state_dict(state["model"])
        b.objective.load_state_dict(state["objective"])
        b.objective.load_state_dict(local["objective"], strict=False)  # this rank's samplers
        optimizer.optimizer.load_state_dict(local["optimizer"] if peer_parallel else state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"--resume: {path} does not fit this config (peers, embedding or objective changed?): "
                        f"{first_line(err, 200)}") from None
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("grad_scaler"):
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    checkpoint.set_rng_state(local["rng"])
    aug_rng.set_state(local["aug_rng"])
    return Progress(state["epoch"], state["batch"], state["step"], json.loads(state["history"]), state["wall_time_s"])

def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def summarize(cfg: C.Config, params: list[int], history: list[dict], wall: float, world: int) -> dict:
    rows = select(history, cfg.peer_names)
    peers = [{"name": n, "arch": p.arch, "params": c, **rows[n]}
             for n, p, c in zip(cfg.peer_names, cfg.peers, params)]
    return {"peers": peers, "ensemble": {"name": "ensemble", **rows["ensemble"]}, "epochs": history[-1]["epoch"],
            "wall_time_s": wall, "seed": cfg.seed, "topology": cfg.topology.kind, "world_size": world,
            "global_batch": cfg.data.batch_size * (world if cfg.placement == "data_parallel" else 1),
            "placement": cfg.placement, "dataset": cfg.data.name,
            "selection": "per model, best validation top-1 (latest epoch on ties); never test"}
