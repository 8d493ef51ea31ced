"""The one training loop. Tasks supply the data, the step and the evaluation; this module does the
rest: DDP, gradient accumulation, autocast, optimiser and schedule, logging, checkpoints, resume,
signals and non-finite losses.

The trained module is a model, or a training objective that holds one (``objectives/``) and names
it in ``model_key``: then checkpoints hold ``model`` = that model's own state and ``objective`` =
the rest (:func:`checkpoint_sections`), and the objective's ``checkpoint_states(ckpt)`` reads them
back (:func:`trained_state`).

Logged values stay on the device until a log line is written (one host transfer per line, none
per micro-batch); with ``train.nan_policy=stop`` a non-finite loss is noticed there too, from a
device-side record of the first such step (and before every evaluation and checkpoint, so neither
sees the diverged weights).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Protocol

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from engine import distributed as D
from engine.checkpoint import (CheckpointWriteError, atomic_torch_save, find_resume, load_checkpoint, rng_state,
                               set_rng_state)
from engine.config import opt, to_dict
from engine.rundir import truncate_log
from engine.threads import AutoThreads, apply_num_threads

log = logging.getLogger("engine")


@dataclass
class OptimConfig:
    lr: float = opt(1e-4, "peak learning rate of the text, fusion and head parameters")
    lr_vision: float = opt(1e-5, "peak learning rate of the ViT image encoder")
    weight_decay: float = opt(0.02, "AdamW weight decay (not applied to biases, norms, temperature)")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    fused: Literal["auto", "on", "off"] = opt("auto", "fused AdamW kernel: auto = on for CPU and CUDA (torch has one for both; on CPU it is about 13x faster than the default per-tensor loop)")
    grad_clip: float = opt(0.0, "clip the global gradient norm to this value (0 = off)")

    def validate(self) -> None:
        for key in ("lr", "lr_vision"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"optim.{key} must be a finite positive number; got {value}")


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "constant"] = opt("cosine", "learning-rate schedule after warm-up")
    warmup_steps: int = opt(1000, "linear warm-up from warmup_start_factor * lr over this many optimiser steps")
    warmup_start_factor: float = opt(0.01, "learning-rate factor at step 0")
    min_lr_ratio: float = opt(0.01, "final learning rate as a fraction of the peak")


@dataclass
class TrainConfig:
    output_dir: str = opt("output/run", "where checkpoints, the resolved config and log.jsonl go")
    epochs: int = opt(30, "passes over the training data")
    max_steps: Optional[int] = opt(None, "stop after this many optimiser steps (overrides epochs when smaller)")
    batch_size: int = opt(512, "GLOBAL batch per optimiser step, over all processes and accumulation steps")
    grad_accum: int = opt(1, "micro-batches per optimiser step (the contrastive batch is one micro-batch)")
    precision: Literal["fp32", "bf16", "fp16"] = opt("fp32", "autocast precision (fp16 uses a gradient scaler)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto = the local GPU when present")
    seed: int = opt(42, "seed for the model, data order, augmentation and masking")
    num_threads: int = opt(0, "torch CPU threads per process; 0 = auto on CPU: the idle CPUs this process may use "
                              "(sched_getaffinity, cgroup quota, /proc/stat over a short sample) shared by the "
                              "processes of this node, at least 1, re-chosen during training (threads_recheck_s); "
                              "OMP_NUM_THREADS, when set, is left as it is. Float results depend on the thread count: "
                              "set it (> 0) for bitwise-reproducible CPU runs and resumes")
    threads_recheck_s: float = opt(60.0, "with num_threads 0 on CPU: seconds between re-choosing the thread count from "
                                         "other programs' CPU use during training (0 = choose once at the start)")
    persistent_workers: bool = opt(True, "keep the training loader's worker processes (data.num_workers) from one epoch to the next instead of starting new ones per epoch (a streamed shard dataset starts new ones); the samples are the same either way")
    log_every: int = opt(50, "optimiser steps between log.jsonl lines")
    loggers: list[str] = opt(["jsonl"], "where every log line goes (engine/loggers.py): jsonl (always), tensorboard (event files in output_dir/tensorboard; the tensorboard package), wandb (output_dir/wandb; the wandb package)")
    wandb_project: str = opt("srcl-vlp", "with loggers wandb: the W&B project")
    wandb_mode: Literal["offline", "online"] = opt("offline", "with loggers wandb: offline writes the run locally (wandb sync uploads it later); online needs network access")
    save_every: int = opt(1000, "optimiser steps between checkpoint_last.pth writes (also at each epoch end)")
    keep_epoch_checkpoints: bool = opt(False, "also keep a copy of each epoch's end, checkpoint_XX.pth (XX = the epoch, from 00); by default a run keeps checkpoint_last.pth and, with a val metric, checkpoint_best.pth only (a paper-scale checkpoint is about 3 GB)")
    nan_policy: Literal["stop", "skip"] = opt("stop", "a non-finite loss: stop the run, or skip the step")
    max_nan_skips: int = opt(10, "with nan_policy skip: consecutive skipped steps before stopping")
    compile: bool = opt(False, "torch.compile the model")
    sharding: Literal["none", "zero", "fsdp"] = opt("none", "with several processes: none = DDP (every process holds everything); zero = DDP + AdamW state sharded over the processes (torch ZeroRedundancyOptimizer, ZeRO-1); fsdp = parameters, gradients and AdamW state sharded (torch FSDP2 fully_shard, one unit per transformer block); no effect with one process")
    fsdp_blocks: list[str] = opt(["Block", "TransformerLayer"], "with sharding=fsdp: class names of the modules that become one FSDP unit each (the transformer blocks); everything else forms the root unit")
    progress: bool = opt(True, "show a progress bar (main process)")
    dist_timeout_s: int = opt(1800, "with several processes (torchrun): seconds a process waits in a collective operation for the others before the run fails; a stopped or wedged process blocks the others this long. It must exceed the longest time one process works alone while the others wait (the main process writing a large checkpoint, training the tokenizer or generating the synthetic data; a first torch.compile step), hence torch's default of 30 min; lower it (e.g. 300) where those take seconds, to fail fast")

    def validate(self) -> None:
        from engine.loggers import check_logger_names
        check_logger_names(self.loggers)
        if self.batch_size <= 0 or self.grad_accum <= 0 or self.epochs <= 0:
            raise ValueError("train.batch_size, train.grad_accum and train.epochs must be positive")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"train.dist_timeout_s must be positive; got {self.dist_timeout_s}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum ({self.grad_accum})")
        for key in ("log_every", "save_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be positive; got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"train.max_steps must be positive (or null = train.epochs decides); got {self.max_steps}")
        if self.max_nan_skips < 0:
            raise ValueError(f"train.max_nan_skips must be >= 0; got {self.max_nan_skips}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("train.device=cuda but this machine has no CUDA device; use train.device=cpu or auto")


class NonFiniteLossError(RuntimeError):
    """A loss part was NaN or infinite."""


_STOP_HINT = "; lower the learning rate, use bf16 instead of fp16, or set train.nan_policy=skip"


class _NonFiniteWatch:
    """``train.nan_policy=stop`` without a host sync per step: the first step whose loss parts are
    not all finite is recorded on the device (its step, epoch and the parts' values);
    :meth:`message` (collective) reads the record."""

    def __init__(self) -> None:
        self.record: Optional[torch.Tensor] = None  # [step, epoch, *values] (float64); step -1: none yet
        self.keys: list[str] = []
        self.pending: Optional[str] = None
        self.unread = False  # steps watched since the record was last read

    def watch(self, step: int, epoch: int, losses: dict[str, torch.Tensor]) -> None:
        first = next(iter(losses.values()))
        values = torch.stack([v.reshape(()).to(first.device, torch.float64) for v in losses.values()])
        if list(losses) != self.keys:  # the first step, or the parts changed (rare): settle the old record
            self.pending = self.pending or self.message()
            self.keys = list(losses)
            self.record = torch.full((2 + len(losses),), -1.0, dtype=torch.float64, device=values.device)
        new = (self.record[0] < 0) & ~torch.isfinite(values).all()
        head = torch.stack([values.new_full((), step), values.new_full((), epoch)])
        self.record = torch.where(new, torch.cat([head, values]), self.record)
        self.unread = True

    def message(self) -> Optional[str]:
        """``None`` while every watched step was finite on every process, else the error message naming
        the first non-finite step (collective: every process calls it at the same point)."""
        if self.pending is not None or not self.unread:
            return self.pending
        self.unread = False
        records = D.all_gather_nograd(self.record[None]).tolist()
        bad = [r for r in records if r[0] >= 0]
        if not bad:
            return None
        first = min(bad, key=lambda r: r[0])
        mine = records[D.rank()]
        part, value = "", float("nan")
        if mine[0] == first[0]:
            part, value = next(((k, v) for k, v in zip(self.keys, mine[2:]) if not math.isfinite(v)), ("", value))
        self.pending = (f"non-finite loss at step {int(first[0])} (epoch {int(first[1])}): "
                        f"{part or 'on another process'} = {value}")
        return self.pending


class Task(Protocol):
    """What a task gives the loop."""

    def steps_per_epoch(self) -> int: ...
    def train_batches(self, epoch: int, start_step: int) -> Iterable[list[dict]]:
        """Micro-batches grouped per optimiser step (``grad_accum`` each), from ``start_step`` on."""
    def train_step(self, model: nn.Module, batch: dict, state: "TrainState") -> dict:
        """Forward on one micro-batch; returns ``loss`` (tensor) and other scalars to log."""
    def evaluate(self, model: nn.Module, epoch: int) -> Optional[dict]: ...
    def checkpoint_extra(self) -> dict: ...
    # optional: ``log_state() -> dict`` of running counters (e.g. ``data/bad_images``), written summed
    # over the processes into every log.jsonl line and printed at the end of the run


@dataclass
class TrainState:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    total_steps: int = 1
    best_metric: Optional[float] = None
    nan_skips: int = 0

    @property
    def progress(self) -> float:
        return self.global_step / max(1, self.total_steps)


def lr_lambda(cfg: ScheduleConfig, total_steps: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / max(1, cfg.warmup_steps)
        if cfg.kind == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def checkpoint_sections(module: nn.Module, state: dict) -> dict:
    """The checkpoint entries of a trained module's full state dict: for a module that names its model
    in ``model_key`` (a training objective), ``model`` = that model's own state and ``objective`` = the
    rest; for a model, ``model``."""
    key = getattr(module, "model_key", None)
    if key is None:
        return {"model": state}
    p = key + "."
    return {"model": {k[len(p):]: v for k, v in state.items() if k.startswith(p)},
            "objective": {k: v for k, v in state.items() if not k.startswith(p)}}


def trained_state(module: nn.Module, ckpt: dict) -> dict:
    """The inverse of :func:`checkpoint_sections`: a checkpoint's state as ``module``'s full state dict.
    An objective reads its checkpoints with its own ``checkpoint_states(ckpt) -> (model state,
    objective state)`` (which also knows the layouts of older checkpoints)."""
    key = getattr(module, "model_key", None)
    if key is None:
        return ckpt["model"]
    model_state, objective_state = module.checkpoint_states(ckpt)
    return {**{f"{key}.{k}": v for k, v in model_state.items()}, **objective_state}


class Trainer:
    """Runs ``task`` with ``model`` (a model, or an objective holding one: see the module docstring):
    builds optimiser/scheduler, wraps DDP, loops, saves, resumes."""

    def __init__(self, cfg: TrainConfig, optim: OptimConfig, sched: ScheduleConfig, model: nn.Module,
                 param_groups: list[dict], dist: D.DistInfo, run_config: Any, find_unused: bool = False) -> None:
        self.cfg, self.dist, self.run_config = cfg, dist, run_config
        self.num_threads = apply_num_threads(cfg.num_threads, dist.device)
        self.auto_threads = (AutoThreads(cfg.threads_recheck_s) if cfg.num_threads == 0 and dist.device.type == "cpu"
                             and not os.environ.get("OMP_NUM_THREADS") and cfg.threads_recheck_s > 0 else None)
        self.out_dir = Path(cfg.output_dir)
        self.loggers = None  # built at the first log line (engine/loggers.py)
        self._resumed_step: Optional[int] = None
        self.model = model
        self.sharding = cfg.sharding if dist.world_size > 1 else "none"
        if cfg.sharding != "none" and dist.world_size == 1:
            log.info("train.sharding=%s has no effect with one process", cfg.sharding)
        self._replicated: list[nn.Parameter] = []  # FSDP: parameters kept whole (scalars)
        if self.sharding == "fsdp":
            param_groups, self._replicated = _fully_shard(model, param_groups, cfg.fsdp_blocks, dist)
        fused = optim.fused == "on" or (optim.fused == "auto" and dist.device.type in ("cpu", "cuda"))
        adamw = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
                     fused=fused or None)
        if self.sharding == "zero":
            from torch.distributed.optim import ZeroRedundancyOptimizer
            self.optimizer = ZeroRedundancyOptimizer(param_groups, optimizer_class=torch.optim.AdamW, **adamw)
        else:
            self.optimizer = torch.optim.AdamW(param_groups, **adamw)
        self.optim_cfg, self.sched_cfg = optim, sched
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.precision == "fp16")
        self.ddp_model: nn.Module = model
        # A module that updates an EMA copy inside forward (the pre-training objective) cannot do so on
        # FSDP shards: the trainer does that update itself, before each micro-batch and outside forward.
        self._momentum_outside = self.sharding == "fsdp" and bool(getattr(model, "momentum_in_forward", False))
        if self._momentum_outside:
            model.momentum_in_forward = False
        if dist.world_size > 1 and self.sharding != "fsdp":
            self.ddp_model = DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                                 broadcast_buffers=False, find_unused_parameters=find_unused)
        if cfg.compile:
            self.ddp_model = torch.compile(self.ddp_model)
        self.state = TrainState()
        self.scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None
        self._nonfinite = _NonFiniteWatch()

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def _full_state(self) -> tuple[dict, dict]:
        """Model and optimiser state dicts in the unsharded single-process format (collective under
        sharding; the gathered copy is complete on the main process only)."""
        if self.sharding == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = get_model_state_dict(self.model, options=opts)
            optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
            return model_sd, (_optim_by_index(optim_sd, self.optimizer, self.model) if self.dist.is_main else {})
        if self.sharding == "zero":
            self.optimizer.consolidate_state_dict(to=0)
            return self.model.state_dict(), (self.optimizer.state_dict() if self.dist.is_main else {})
        return self.model.state_dict(), self.optimizer.state_dict()

    def _checkpoint(self, task: Task) -> dict:
        rngs = D.all_gather_object(rng_state())
        model_sd, optim_sd = self._full_state()
        return {
            **checkpoint_sections(self.model, model_sd),
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": vars(self.state).copy(),
            "rng": rngs,
            "config": to_dict(self.run_config),
            **task.checkpoint_extra(),
        }

    def save(self, task: Task, name: str = "checkpoint_last.pth") -> Optional[Path]:
        self._raise_if_nonfinite()  # no checkpoint of diverged weights
        ckpt = self._checkpoint(task)  # collective (rng gather): every rank calls it
        path, error = None, None
        if self.dist.is_main:
            try:
                path = atomic_torch_save(ckpt, self.out_dir / name)
            except CheckpointWriteError as err:  # every process stops with it (none waits forever)
                error = str(err)
        error = D.broadcast_object(error)
        if error is not None:
            raise CheckpointWriteError(error)
        return path

    def resume(self, path: str) -> None:
        ckpt = load_checkpoint(find_resume(path))
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if self.sharding == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, strict=True)
            set_model_state_dict(self.model, trained_state(self.model, ckpt), options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, _optim_by_name(ckpt["optimizer"], self.optimizer, self.model),
                                     options=StateDictOptions(full_state_dict=True, strict=False))  # unused parameters have no state
        else:
            self.model.load_state_dict(trained_state(self.model, ckpt), strict=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self._reapply_hyperparameters(fresh)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        rngs = ckpt["rng"]
        if len(rngs) != self.dist.world_size:
            log.warning("checkpoint was written by %d processes, resuming with %d: random streams differ",
                        len(rngs), self.dist.world_size)
        set_rng_state(rngs[self.dist.rank % len(rngs)])
        if self.dist.is_main:
            log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.global_step)

    def _reapply_hyperparameters(self, fresh: list[dict]) -> None:
        """The optimiser hyperparameters of this run's config (``fresh``: the param groups before the
        checkpoint was loaded), not the resumed state's: a resume may change the learning rates,
        weight decay, betas and eps (tasks/resume.py). Unchanged values give the same numbers."""
        groups = self.optimizer.param_groups
        for g, f in zip(groups, fresh):
            for key in ("initial_lr", "weight_decay", "betas", "eps"):
                if key in f:
                    g[key] = f[key]
        sched = self.scheduler
        sched.base_lrs = [f["initial_lr"] for f in fresh]
        for g, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas):
            g["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in groups]

    def _log(self, record: dict) -> None:
        """One log record to every sink of ``train.loggers`` (main process)."""
        if self.dist.is_main:
            if self.loggers is None:
                from engine.loggers import build_loggers
                c = self.cfg
                self.loggers = build_loggers(c.loggers, self.out_dir, resume_step=self._resumed_step,
                                             config=to_dict(self.run_config), wandb_project=c.wandb_project,
                                             wandb_mode=c.wandb_mode)
            self.loggers.log(record)

    def close_loggers(self) -> None:
        if self.loggers is not None:
            self.loggers.close()
            self.loggers = None

    # ------------------------------------------------------------------ loop
    def fit(self, task: Task, resume: Optional[str] = None, metric_key: Optional[str] = None) -> TrainState:
        """Train ``task`` to the end (or a stop signal); the log sinks are closed however it ends."""
        try:
            return self._fit(task, resume, metric_key)
        finally:
            self.close_loggers()

    def _fit(self, task: Task, resume: Optional[str], metric_key: Optional[str]) -> TrainState:
        cfg = self.cfg
        spe = task.steps_per_epoch()
        total = cfg.epochs * spe
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.sched_cfg, total))
        self.state.total_steps = total
        if resume:
            self.resume(resume)
            self.state.total_steps = total
            self._resumed_step = self.state.global_step
            if self.dist.is_main:  # the steps after the checkpoint are logged again
                truncate_log(self.out_dir / "log.jsonl", self.state.global_step,
                             drop_eval_at_step=self.state.step_in_epoch >= spe)
        st = self.state
        bar = tqdm(total=total, initial=st.global_step, disable=not (cfg.progress and self.dist.is_main),
                   desc="train", dynamic_ncols=True, smoothing=0.1)
        window: dict[str, list] = {}  # key -> [sum (a device tensor or a float), count]
        t_window, pairs_window = time.perf_counter(), 0
        with _StopFlag() as stop:
            while st.epoch < cfg.epochs and st.global_step < total:
                for micro_batches in task.train_batches(st.epoch, st.step_in_epoch):
                    logs = self._step(task, micro_batches)
                    st.global_step += 1
                    if self.auto_threads is not None:
                        self.auto_threads.maybe_update()
                    st.step_in_epoch += 1
                    pairs_window += int(logs.pop("_pairs"))
                    for k, v in logs.items():  # no host sync: tensors are summed on the device
                        if k in window:
                            window[k][0] = window[k][0] + v
                            window[k][1] += 1
                        else:
                            window[k] = [v, 1]
                    bar.update(1)
                    if st.global_step % cfg.log_every == 0 or st.global_step == total:
                        self._raise_if_nonfinite()
                        dt = time.perf_counter() - t_window
                        rec = {"step": st.global_step, "epoch": st.epoch,
                               "lr": self.optimizer.param_groups[0]["lr"],
                               "pairs_per_s": pairs_window * self.dist.world_size / max(dt, 1e-9)}
                        rec.update(self._reduce_window(window))
                        rec.update(self._task_state(task))
                        self._log(rec)
                        if self.dist.is_main:
                            post = {k: f"{v:.3f}" for k, v in rec.items() if k.startswith("loss")}
                            post["pairs/s"] = f"{rec['pairs_per_s']:.1f}"
                            bar.set_postfix(post, refresh=False)
                        window, t_window, pairs_window = {}, time.perf_counter(), 0
                    stop_now = self._stop_requested(stop)
                    if stop_now or st.global_step % cfg.save_every == 0:
                        self.save(task)
                    if stop_now:
                        bar.close()
                        self._report_task_state(task)
                        if self.dist.is_main:
                            print(f"stopped by signal at step {st.global_step}; checkpoint saved to "
                                  f"{self.out_dir / 'checkpoint_last.pth'}; continue with --resume {self.out_dir}", flush=True)
                        return st
                    if st.global_step >= total:
                        break
                epoch_done = st.step_in_epoch >= spe
                self._raise_if_nonfinite()  # no evaluation of diverged weights
                with self._root_unsharded():
                    metrics = task.evaluate(self.model, st.epoch)
                if epoch_done:
                    st.epoch += 1
                    st.step_in_epoch = 0
                # max_steps reached inside an epoch: evaluate and keep the position for a resume
                self._after_epoch(task, metrics, metric_key, epoch_done)
                if not epoch_done:
                    break
        bar.close()
        self._raise_if_nonfinite()
        self._report_task_state(task)
        return st

    def _task_state(self, task: Task) -> dict:
        """``task.log_state()`` (when the task has it) summed over the processes (collective)."""
        fn = getattr(task, "log_state", None)
        state = fn() if fn is not None else {}
        if not state:
            return {}
        keys = sorted(state)
        total = D.all_reduce_sum(torch.tensor([float(state[k]) for k in keys], dtype=torch.float64))
        return {k: (int(v) if float(v).is_integer() else v) for k, v in zip(keys, total.tolist())}

    def _report_task_state(self, task: Task) -> None:
        state = self._task_state(task)
        if state and self.dist.is_main:
            print("end of training: " + ", ".join(f"{k} {v}" for k, v in state.items())
                  + (" (summed over the processes)" if self.dist.world_size > 1 else ""), flush=True)

    def _after_epoch(self, task: Task, metrics: Optional[dict], metric_key: Optional[str], epoch_done: bool = True) -> None:
        st = self.state
        if metrics:
            self._log({"step": st.global_step, "epoch": st.epoch - (1 if epoch_done else 0), **{f"eval/{k}": v for k, v in metrics.items()}})
        self.save(task)
        if epoch_done and self.cfg.keep_epoch_checkpoints:
            self.save(task, f"checkpoint_{st.epoch - 1:02d}.pth")
        if metric_key and metrics and metric_key in metrics:
            value = float(metrics[metric_key])
            if st.best_metric is None or value > st.best_metric:
                st.best_metric = value
                self.save(task, "checkpoint_best.pth")

    @contextlib.contextmanager
    def _root_unsharded(self):
        """Under FSDP, the root unit's parameters gathered (for evaluation code that calls model
        methods rather than ``model(...)``); the block units gather themselves when called."""
        if self.sharding != "fsdp":
            yield
            return
        self.model.unshard()
        try:
            yield
        finally:
            self.model.reshard()

    def _reduce_window(self, window: dict[str, list]) -> dict[str, float]:
        """Mean of each logged value over the window and over all processes: the device sums come to
        the host together, once (the sums are float64, as the Python floats they used to be)."""
        keys = sorted(window)
        on_device = [k for k in keys if torch.is_tensor(window[k][0])]
        if on_device:
            first = window[on_device[0]][0]
            sums = torch.stack([window[k][0].reshape(()).to(first.device, torch.float64) for k in on_device])
            host = dict(zip(on_device, sums.tolist()))
        else:
            host = {}
        local = torch.tensor([host.get(k, window[k][0]) / window[k][1] for k in keys], dtype=torch.float64)
        return dict(zip(keys, D.all_reduce_mean(local).tolist()))

    def _raise_if_nonfinite(self) -> None:
        """``train.nan_policy=stop``: stop at the first non-finite loss since the start (collective)."""
        msg = self._nonfinite.message()
        if msg is not None:
            raise NonFiniteLossError(msg + _STOP_HINT)

    def _stop_requested(self, stop: _StopFlag) -> bool:
        if self.dist.world_size == 1:
            return stop.signum is not None
        flag = torch.tensor([1.0 if stop.signum is not None else 0.0])
        return bool(D.all_reduce_sum(flag).item() > 0)

    def _step(self, task: Task, micro_batches: list[dict]) -> dict:
        """One optimiser step; returns the logged values averaged over the micro-batches: float64
        device tensors (no host sync) and Python numbers as the task gave them."""
        cfg, st = self.cfg, self.state
        self.ddp_model.train()
        n = len(micro_batches)
        sums: dict[str, Any] = {}
        pairs = 0
        denom: dict[torch.device, torch.Tensor] = {}  # n on each device: a true division there, as on the host
        for i, mb in enumerate(micro_batches):
            sync = contextlib.nullcontext() if (i == n - 1 or not isinstance(self.ddp_model, DDP)) else self.ddp_model.no_sync()
            if self._momentum_outside:
                self.model.momentum_update()  # on the shards, as forward would have done first
            with sync:
                with self.autocast():
                    out = task.train_step(self.ddp_model, mb, st)
                loss = out["loss"]
                self.scaler.scale(loss / n).backward()
            for k, v in out.items():
                if k.startswith("_"):
                    continue
                if torch.is_tensor(v):
                    if v.device not in denom:
                        denom[v.device] = torch.full((), float(n), dtype=torch.float64, device=v.device)
                    term = v.detach().to(torch.float64) / denom[v.device]
                else:
                    term = float(v) / n
                sums[k] = sums[k] + term if k in sums else term
            pairs += int(out.get("_pairs", 0))
        for p in self._replicated:  # FSDP leaves these to us: average their gradients like DDP
            p.grad = D.all_reduce_mean(p.grad if p.grad is not None else torch.zeros_like(p))
        losses = {k: v for k, v in sums.items() if k.startswith("loss")}
        host_bad = next((k for k, v in losses.items() if not torch.is_tensor(v) and not math.isfinite(v)), "")
        if cfg.nan_policy == "stop" and not host_bad:
            tensors = {k: v for k, v in losses.items() if torch.is_tensor(v)}
            if tensors:  # checked at the next log line, evaluation or checkpoint
                self._nonfinite.watch(st.global_step, st.epoch, tensors)
        else:
            bad_part = host_bad or next((k for k, v in losses.items() if not math.isfinite(float(v))), "")
            # agree on finiteness across ranks
            flag = D.all_reduce_sum(torch.tensor([1.0 if bad_part else 0.0]))
            if flag.item() > 0:
                self.optimizer.zero_grad(set_to_none=True)
                msg = (f"non-finite loss at step {st.global_step} (epoch {st.epoch}): "
                       f"{bad_part or 'on another process'} = {float(sums.get(bad_part, float('nan')))}")
                if cfg.nan_policy == "stop":
                    raise NonFiniteLossError(msg + _STOP_HINT)
                st.nan_skips += 1
                log.warning(msg + "; step skipped (%d in a row)", st.nan_skips)
                if st.nan_skips > cfg.max_nan_skips:
                    raise NonFiniteLossError(msg + f"; more than train.max_nan_skips={cfg.max_nan_skips} steps in a row")
                with warnings.catch_warnings():  # the schedule advances with the step count, skipped or not
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()
                return {**sums, "_pairs": pairs, "nan_skipped": 1.0}
            st.nan_skips = 0
        if self.optim_cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
            sums["grad_norm"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach().to(torch.float64)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**sums, "_pairs": pairs}


def _fully_shard(model: nn.Module, param_groups: list[dict], blocks: list[str],
                 dist: D.DistInfo) -> tuple[list[dict], list[nn.Parameter]]:
    """FSDP2: one unit per module whose class name is in ``blocks``, the rest in the root unit;
    parameters become sharded DTensors in place, so ``param_groups`` are rebuilt by name.
    Scalar parameters (the temperature) cannot be sharded: they stay whole on every process and
    are returned, for the trainer to average their gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in param_groups]
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    units = [m for m in model.modules() if type(m).__name__ in set(blocks) and m is not model]
    if not units:
        raise ValueError(f"train.fsdp_blocks={blocks} matches no module of {type(model).__name__}")
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for m in units:
        fully_shard(m, mesh=mesh, ignored_params=scalars)
    fully_shard(model, mesh=mesh, ignored_params=scalars)
    params = dict(model.named_parameters())
    groups = [{**g, "params": [params[n] for n in ns]} for g, ns in zip(param_groups, group_names)]
    return groups, [p for p in params.values() if p.ndim == 0 and p.requires_grad]


def _param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """Names of the optimiser's parameters in state-dict index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _optim_by_index(sd: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """A name-keyed (torch.distributed.checkpoint) optimiser state dict -> the usual index-keyed one,
    so sharded and unsharded runs write the same checkpoint format."""
    index = {n: i for i, n in enumerate(_param_names(optimizer, model))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    return {"state": {index[n]: v for n, v in sd["state"].items()}, "param_groups": groups}


def _optim_by_name(sd: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """The inverse of :func:`_optim_by_index`."""
    names = _param_names(optimizer, model)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {names[int(i)]: v for i, v in sd["state"].items()}, "param_groups": groups}


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
