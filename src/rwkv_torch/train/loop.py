"""The training loop: ``train(config)``. Single process, CPU or one GPU.

Stateful: with ``stride == window_size`` every batch row walks one episode/document window after window and the
recurrent state is carried (detached) from one window to the next, so what is trained is what the O(1) ``step``
runs. ``truncate_bptt`` splits a window into shorter back-propagation spans inside one optimizer step.

The official RWKV recipe (spec 4.7): ``att.w0`` (v7) / ``time_decay`` (v4-v6) at 2x lr and v4 ``time_first`` at 3x;
weight decay only on 2-D ``.weight`` tensors; Adam betas (0.9, 0.99); grad-clip 1.0; a warm-up factor
``0.01 + 0.99 * step / warmup`` on a cosine from ``lr`` to ``lr_final``; L2Wrap on the LM loss.

Resuming (``resume``) restores weights, optimizer, scheduler, RNG states, the carried state and the data position,
so on CPU the losses continue bit for bit.

Distributed: under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1``) the model is wrapped in DDP (gloo on CPU,
nccl on GPU) and the ``batch_size`` lanes of each global batch are split evenly over the ranks, so N processes
train on exactly the batches one process would (same data order, the gradient averaged over the global batch).
Rank 0 alone evaluates, logs, plots and writes checkpoints; a checkpoint holds the carried state of every lane
(gathered from all ranks), so a run can be resumed with another number of processes.
"""

import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..task import Dataset, load_weights
from .checkpointing import CHECKPOINT_FORMAT, claim_run_dir, resume_config, save_checkpoint
from .config import TrainConfig, as_config
from .data import check_window, data_kind, load_data, make_batch, split_by_sequence, window_counts, window_plans
from .distributed import all_mean, any_rank, gather_lanes, init_distributed
from .finetune import has_lora, init_config, merge_lora, trainable_state_dict
from .model import adamw, build_model, lr_factor, param_groups
from .plots import write_plot
from .signals import StopSignal
from .step import evaluate, state_like, state_tensors, train_step
from .units import bar_postfix, label_metrics, loss_unit


def train(args_or_config, *, sources: dict | None = None) -> dict:
    """Train a model; see ``TrainConfig`` and ``rwkv-torch train --help``.

    Writes to the run directory ``out``: ``config.json``, ``metrics.jsonl`` (one JSON object per logged step with
    ``step``, ``loss``, ``lr``, ``tokens_per_s`` and, at eval steps, ``val_loss``), ``loss.png`` when matplotlib is
    installed, ``ckpt-<step>.pt`` checkpoints (the newest ``keep_checkpoints``) and, for an RWKV language model,
    ``model/`` (``rt.save`` format: ``rt.load``, ``rwkv-torch generate --model``). Nothing is written before the
    data is loaded and the model built (a run that cannot start leaves its folder as it was). A run folder holds one
    run: a new run into a folder with another run's files raises ValueError (``resume`` continues that run,
    ``overwrite`` deletes its files first); resuming a finished run raises ValueError saying so. The last step is
    logged also when a run stops early (``stop_after``, ``time_limit``, SIGINT/SIGTERM); a signal prints how to
    resume. ``sources`` maps a file suffix to a loader of episode data the package does not read itself
    (``rwkv_torch.slippi.DATA_SOURCES`` for ``.slp`` replays; the CLI passes it): see ``data.load_data``.

    Returns a summary dict with ``step``, ``loss``, ``val_loss``, ``run_dir``, ``checkpoint``, ``model_dir``,
    ``interrupted`` and ``signal`` (the signal number that stopped the run on this rank, or None).
    """
    given = dict(args_or_config) if isinstance(args_or_config, dict) else (
        {} if isinstance(args_or_config, TrainConfig) else vars(args_or_config))
    cfg, ckpt = as_config(args_or_config), None
    if isinstance(args_or_config, TrainConfig):
        given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if given.get("epochs") is not None and given.get("steps") is not None:
        raise ValueError("give steps or epochs, not both")
    if cfg.resume and cfg.overwrite:
        raise ValueError("give resume or overwrite, not both: --resume continues the run, --overwrite starts anew")
    if cfg.resume:
        cfg, ckpt = resume_config(cfg, given)
        if ckpt["step"] >= cfg.steps:
            raise ValueError(f"--resume {cfg.out}: the run is finished (step {ckpt['step']} of {cfg.steps}); "
                             f"give --steps N with N > {ckpt['step']} to train it further")
    else:
        check_action_delay(cfg, given)
        cfg = controller_head(cfg)
        if cfg.init_from is not None:
            cfg = init_config(cfg, given)
    rank, world, device, created_group = init_distributed(cfg)
    try:
        run = setup(cfg, ckpt, rank, world, device, sources)
        if ckpt is not None:
            restore(run, ckpt)
        stop = run_loop(run)
        return finish(run, stop)
    finally:
        if created_group:
            dist.destroy_process_group()


def check_action_delay(cfg: TrainConfig, given: dict) -> None:
    """``--action-delay`` is for ``.slp`` replays, and there at least 1 (the state after frame t already shows the
    input on frame t: with 0 the model would read its answer from the features)."""
    kind = data_kind(cfg.data)
    if kind != "slippi" and given.get("action_delay") is not None:
        raise ValueError(f"--action-delay is for .slp replays; --data {cfg.data} is {kind} data (it has no delay "
                         f"to set)")
    if kind == "slippi" and cfg.action_delay < 1:
        raise ValueError(f"--action-delay {cfg.action_delay}: at least 1 frame, the least a bot can play at (the "
                         f"state after frame t already shows the input on frame t)")


def controller_head(cfg: TrainConfig) -> TrainConfig:
    """``--controller-head``: autoregressive by default for Melee replays (``.slp`` or a prepared dataset of them),
    independent heads for other episode data; a text model has its LM head (refused)."""
    kind = data_kind(cfg.data)
    replays = ("slippi", "slippi-dataset")
    if kind in replays and cfg.controller_head is None:
        return dataclasses.replace(cfg, controller_head="autoregressive")
    if kind not in (*replays, "episodes") and cfg.controller_head is not None:
        raise ValueError(f"--controller-head is for episode data (.slp, .npz); --data {cfg.data} is {kind} data")
    return cfg


@dataclass
class Run:
    """What the loop works on: the configuration, this process's place, the data, model, optimizer and position."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    data: Dataset
    train_data: Dataset
    val_data: Dataset | None
    model: nn.Module
    net: nn.Module  # the model as stepped: DDP- and torch.compile-wrapped where asked
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    plans: object  # data.WindowPlans
    lanes: slice  # this rank's rows of each batch
    state: object  # the carried recurrent state of this rank's lanes
    step: int = 0
    held_out: list = dataclasses.field(default_factory=list)  # names of the held-out sequences (in checkpoints)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def setup(cfg: TrainConfig, ckpt, rank: int, world: int, device, sources: dict | None = None) -> Run:
    """Claim the run folder, load and split the data, build the model and optimizer; for a new run, write
    ``config.json`` once everything is known to start (nothing is written before)."""
    lead = rank == 0
    run_dir = Path(cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if ckpt is None:  # a new run: the folder must not hold another one (every rank checks before any writes)
        claim_run_dir(run_dir, cfg.overwrite, lead, delete=False)
        if world > 1:
            dist.barrier()
    data = load_data(cfg.data, cfg.max_bytes, cfg.tokenizer, cfg.action_delay, cfg.progress and lead, sources)
    check_window(data, cfg.window_size)
    train_data, val_data = split_by_sequence(data, cfg.val_fraction, cfg.seed)
    held_out = [] if val_data is None else [s.name for s in val_data.sequences]
    check_window(train_data, cfg.window_size)
    if val_data is not None and max(len(s) for s in val_data.sequences) < cfg.window_size:
        val_data = None  # no held-out sequence holds a full window
    if cfg.epochs is not None:  # the same data and options give the same count, so a resumed run agrees
        windows = sum(window_counts([len(s) for s in train_data.sequences], cfg.window_size,
                                    cfg.stride or cfg.window_size))
        cfg = dataclasses.replace(cfg, steps=max(1, math.ceil(cfg.epochs * windows / cfg.batch_size)))
    model = build_model(cfg, data).to(device)
    if cfg.gradient_checkpoint:
        if not hasattr(model.backbone, "gradient_checkpointing"):
            raise ValueError(f"--gradient-checkpoint is for the RWKV backbones, not {cfg.backbone}")
        model.backbone.gradient_checkpointing = True
    net = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net, backend="inductor" if cfg.compile is True else cfg.compile)
    opt = adamw(param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr, device=device, betas=(0.9, 0.99),
                eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    plans = window_plans([len(s) for s in train_data.sequences], cfg.window_size, cfg.stride or cfg.window_size,
                         cfg.batch_size, cfg.seed)
    lanes = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    run = Run(cfg, rank, world, device, run_dir, data, train_data, val_data, model, net, opt, sched, plans, lanes,
              model.init_state(lanes.stop - lanes.start, device=device), held_out=held_out)
    if ckpt is None:
        if lead:  # the run starts: only now its folder changes
            claim_run_dir(run_dir, cfg.overwrite, lead)
            run_dir.mkdir(parents=True, exist_ok=True)
            if run.metrics_path.exists():
                run.metrics_path.unlink()
            if cfg.warmup >= cfg.steps:
                warnings.warn(f"warmup={cfg.warmup} >= the {cfg.steps} planned steps: the learning rate never "
                              f"reaches lr={cfg.lr:g}", stacklevel=3)
        if world > 1:
            dist.barrier()
    if lead:  # after --epochs set the planned steps (a resumed run: its overrides)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return run


def restore(run: Run, ckpt: dict) -> None:
    """A resumed run: weights, optimizer, scheduler, RNG, carried state and the data order's position, as saved."""
    load_weights(run.model, ckpt["model"], strict=not ckpt.get("partial", False), source=run.cfg.resume)
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    ranks_rng = ckpt.get("rng_cpu_ranks")
    same_world = ranks_rng is not None and len(ranks_rng) == run.world
    torch.set_rng_state(ranks_rng[run.rank] if same_world else ckpt["rng_cpu"])
    if run.device.type == "cuda" and ckpt["rng_cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], run.device)
    run.state = state_like(run.state, [t[run.lanes].to(run.device) for t in ckpt["carry"]])
    run.step = ckpt["step"]
    if "plans" in ckpt:
        run.plans.load_state_dict(ckpt["plans"])
    else:  # a checkpoint from before the position was saved: replay the data order up to it
        run.plans.skip(run.step)
    if run.lead and run.metrics_path.exists():  # drop what a killed run logged after its last checkpoint
        keep = [ln for ln in run.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= run.step]
        run.metrics_path.write_text("".join(ln + "\n" for ln in keep))


def save(run: Run):
    """A checkpoint of the run as it stands. Collective (every rank gathers its carried state and RNG); rank 0
    writes the file and returns its path (the others None)."""
    cfg, data, model = run.cfg, run.data, run.model
    carry = gather_lanes(state_tensors(run.state), run.world)
    rngs = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, torch.get_rng_state())
    if not run.lead:
        return None
    payload = dict(format=CHECKPOINT_FORMAT, format_version=1, step=run.step, config=dataclasses.asdict(cfg),
                   targets=[dataclasses.asdict(t) for t in data.targets], embed_dim=data.embed_dim,
                   ids=[dataclasses.asdict(i) for i in data.ids], vocab_size=data.vocab_size,
                   partial=cfg.finetune_mode, held_out=run.held_out, data_meta=dict(data.meta),
                   run_cwd=os.getcwd(),  # where the held-out names' relative paths start
                   model=trainable_state_dict(model) if cfg.finetune_mode else model.state_dict(),
                   optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(), plans=run.plans.state_dict(),
                   rng_cpu=torch.get_rng_state(), rng_cpu_ranks=rngs if run.world > 1 else None,
                   rng_cuda=torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None, carry=carry)
    return save_checkpoint(run.run_dir, run.step, payload, cfg.keep_checkpoints)


class Log:
    """``metrics.jsonl`` (rank 0; the other ranks write nowhere) and the ``loss.png`` redrawn at every evaluation."""

    def __init__(self, run: Run, file):
        self.run, self.file, self.plot_said = run, file, False

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def plot(self) -> None:
        if not write_plot(self.run.run_dir) and not self.plot_said:
            self.plot_said = True
            from tqdm.auto import tqdm  # one line above the progress bar, not a warning that breaks into it

            tqdm.write("note: matplotlib is not installed: no loss.png is written (pip install rwkv-torch[plot] adds "
                       "it)", file=sys.stderr)


@dataclass
class Stop:
    """How the loop ended: the last loss and evaluation, the final checkpoint, and the signal that stopped it."""

    loss: float
    last_eval: dict
    checkpoint: Path | None
    signum: int | None
    interrupted: bool
    params: int


def run_loop(run: Run) -> Stop:
    """Steps until ``steps``, ``stop_after``, ``time_limit`` or a signal, logging, evaluating and checkpointing as
    configured; the last step is logged and checkpointed however the loop ends."""
    cfg, world, device = run.cfg, run.world, run.device
    unit = "tokens" if run.data.is_text else "frames"
    loss_u = loss_unit(run.data, cfg.tokenizer)
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, run.step + cfg.stop_after)
    loss, last_eval, ckpt_path, per_step = float("nan"), {}, None, cfg.batch_size * cfg.window_size
    from tqdm.auto import tqdm

    n_params = sum(p.numel() for p in run.model.parameters())
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not (cfg.progress and run.lead), dynamic_ncols=True,
               desc=f"{cfg.backbone} {n_params / 1e6:.2f}M" + (f" x{world} ranks" if world > 1 else ""))
    row, logged = None, True
    with StopSignal() as stop, open(run.metrics_path if run.lead else os.devnull, "a") as file:
        log = Log(run, file)
        t_last = time.perf_counter()
        deadline = math.inf if cfg.time_limit is None else t_last + cfg.time_limit
        while run.step < end and not any_rank(stop.signum is not None or time.perf_counter() > deadline, world,
                                              device):
            batch = make_batch(run.train_data, next(run.plans)[run.lanes], cfg.window_size)
            lr = run.sched.get_last_lr()[0]
            loss, parts, run.state = train_step(run.net, run.opt, run.train_data, batch, run.state, cfg, device)
            if world > 1:
                loss, *vals = all_mean([loss, *parts.values()], world, device)
                parts = dict(zip(parts, vals))
            run.sched.step()
            run.step += 1
            now = time.perf_counter()
            rate, t_last = per_step / max(now - t_last, 1e-9), now
            row = {"step": run.step, "loss": loss, "lr": lr, f"{unit}_per_s": rate}
            if len(parts) > 1:
                row.update({f"loss_{k}": v for k, v in parts.items()})
            if run.lead and run.val_data is not None and (run.step % cfg.eval_every == 0 or run.step == cfg.steps):
                last_eval = evaluate(run.model, run.val_data, cfg, device)
                row.update(last_eval)
            label_metrics(row, loss_u)
            logged = run.step % cfg.log_every == 0 or "val_loss" in row or run.step == end
            if logged:
                log.write(row)
            if run.lead and "val_loss" in row:
                log.plot()
            bar.update(1)
            bar.set_postfix(bar_postfix(loss, loss_u, rate, unit, last_eval.get("val_loss")))
            if run.step % cfg.save_every == 0 and run.step < end:
                ckpt_path = save(run)
        bar.close()
        if not logged:  # stopped early (time_limit, a signal): the last step is logged too
            log.write(row)
        ckpt_path = save(run)
    if run.lead:
        log.plot()
    return Stop(loss, last_eval, ckpt_path, stop.signum, any_rank(stop.signum is not None, world, device), n_params)


def finish(run: Run, stop: Stop) -> dict:
    """Rank 0 writes what the run is used by (a language model's ``model/``, a learned ``state.safetensors``) and
    says how to resume an interrupted run; every rank returns the summary."""
    cfg, model, model_dir = run.cfg, run.model, None
    if run.lead:
        if run.data.is_text and cfg.backbone.startswith("rwkv") and not cfg.train_state:
            # the language model itself, for generate/export (LoRA merged into plain weights)
            from ..checkpoints import save as save_model

            backbone = merge_lora(copy.deepcopy(model.backbone)) if has_lora(model.backbone) else model.backbone
            model_dir = str(save_model(backbone, run.run_dir / "model"))
        if model.state0 is not None:  # the learned initial state: generate --state-in, Stream, the replay policy
            model.state0.as_state(model.backbone.init_state(1)).save(run.run_dir / "state.safetensors")
    if run.lead and stop.interrupted:
        name = signal.Signals(stop.signum).name if stop.signum is not None else "a signal on another rank"
        print(f"interrupted by {name} at step {run.step} of {cfg.steps}; checkpoint {stop.checkpoint}; resume with: "
              f"rwkv-torch train --resume {run.run_dir}", flush=True)
    return dict(model_dir=model_dir, step=run.step, loss=stop.loss, val_loss=stop.last_eval.get("val_loss"),
                run_dir=str(run.run_dir), checkpoint=str(stop.checkpoint), interrupted=stop.interrupted,
                loss_unit=loss_unit(run.data, cfg.tokenizer), signal=stop.signum, params=stop.params, rank=run.rank,
                world_size=run.world)
