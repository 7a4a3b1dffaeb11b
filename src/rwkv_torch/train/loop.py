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
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpointing import CHECKPOINT_FORMAT, claim_run_dir, resume_config, save_checkpoint
from .config import TrainConfig, as_config
from .data import check_window, load_data, make_batch, split_by_sequence, window_counts, window_plans
from .distributed import all_mean, any_rank, gather_lanes, init_distributed
from .finetune import has_lora, init_config, merge_lora, trainable_state_dict
from .model import adamw, build_model, lr_factor, param_groups
from .plots import write_plot
from .signals import StopSignal
from .step import evaluate, state_like, state_tensors, train_step


def train(args_or_config) -> dict:
    """Train a model; see ``TrainConfig`` and ``rwkv-torch train --help``.

    Writes to the run directory ``out``: ``config.json``, ``metrics.jsonl`` (one JSON object per logged step with
    ``step``, ``loss``, ``lr``, ``tokens_per_s`` and, at eval steps, ``val_loss``), ``loss.png`` when matplotlib is
    installed, ``ckpt-<step>.pt`` checkpoints (the newest ``keep_checkpoints``) and, for an RWKV language model,
    ``model/`` (``rt.save`` format: ``rt.load``, ``rwkv-torch generate --model``). A run folder holds one run: a
    new run into a folder with another run's files raises ValueError (``resume`` continues that run, ``overwrite``
    deletes its files first). The last step is logged also when a run stops early (``stop_after``, ``time_limit``,
    SIGINT/SIGTERM); a signal prints how to resume. Returns a summary dict with ``step``, ``loss``, ``val_loss``,
    ``run_dir``, ``checkpoint``, ``model_dir``, ``interrupted`` and ``signal`` (the signal number that stopped the
    run on this rank, or None).
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
    elif cfg.init_from is not None:
        cfg = init_config(cfg, given)
    rank, world, device, created_group = init_distributed(cfg)
    try:
        return _train(cfg, ckpt, rank, world, device)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ckpt, rank: int, world: int, device) -> dict:
    lead = rank == 0
    run_dir = Path(cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if ckpt is None:  # a new run: the folder must not hold another one (every rank checks before any writes)
        claim_run_dir(run_dir, cfg.overwrite, lead)
        if world > 1:
            dist.barrier()
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)

    data = load_data(cfg.data, cfg.max_bytes, cfg.tokenizer, cfg.action_delay, cfg.progress and lead)
    check_window(data, cfg.window_size)
    train_data, val_data = split_by_sequence(data, cfg.val_fraction, cfg.seed)
    check_window(train_data, cfg.window_size)
    if val_data is not None and max(len(s) for s in val_data.sequences) < cfg.window_size:
        val_data = None  # no held-out sequence holds a full window
    if cfg.epochs is not None:  # the same data and options give the same count, so a resumed run agrees
        windows = sum(window_counts([len(s) for s in train_data.sequences], cfg.window_size,
                                    cfg.stride or cfg.window_size))
        cfg = dataclasses.replace(cfg, steps=max(1, math.ceil(cfg.epochs * windows / cfg.batch_size)))
    if lead:  # after --epochs set the planned steps
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if ckpt is None and cfg.warmup >= cfg.steps:
            warnings.warn(f"warmup={cfg.warmup} >= the {cfg.steps} planned steps: the learning rate never reaches "
                          f"lr={cfg.lr:g}", stacklevel=3)
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
    lengths = [len(s) for s in train_data.sequences]
    plans = window_plans(lengths, cfg.window_size, cfg.stride or cfg.window_size, cfg.batch_size, cfg.seed)
    lanes = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)  # this rank's batch rows
    state = model.init_state(lanes.stop - lanes.start, device=device)
    step = 0
    metrics_path = run_dir / "metrics.jsonl"
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=not ckpt.get("partial", False))
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        ranks_rng = ckpt.get("rng_cpu_ranks")
        same_world = ranks_rng is not None and len(ranks_rng) == world
        torch.set_rng_state(ranks_rng[rank] if same_world else ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt["rng_cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        state = state_like(state, [t[lanes].to(device) for t in ckpt["carry"]])
        step = ckpt["step"]
        for _ in range(step):  # replay the data order up to the checkpoint
            next(plans)
        if lead and metrics_path.exists():  # drop what a killed run logged after its last checkpoint
            keep = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            metrics_path.write_text("".join(ln + "\n" for ln in keep))
    elif lead and metrics_path.exists():
        metrics_path.unlink()

    def save(step: int):
        """Collective (every rank gathers its carried state and RNG); rank 0 writes the file."""
        carry = gather_lanes(state_tensors(state), world)
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, torch.get_rng_state())
        if not lead:
            return None
        payload = dict(format=CHECKPOINT_FORMAT, format_version=1, step=step, config=dataclasses.asdict(cfg),
                       targets=[dataclasses.asdict(t) for t in data.targets], embed_dim=data.embed_dim,
                       ids=[dataclasses.asdict(i) for i in data.ids],
                       vocab_size=data.vocab_size, partial=cfg.finetune_mode,
                       model=trainable_state_dict(model) if cfg.finetune_mode else model.state_dict(),
                       optimizer=opt.state_dict(),
                       scheduler=sched.state_dict(), rng_cpu=torch.get_rng_state(),
                       rng_cpu_ranks=rngs if world > 1 else None,
                       rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None, carry=carry)
        return save_checkpoint(run_dir, step, payload, cfg.keep_checkpoints)

    unit = "tokens" if data.is_text else "frames"
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, step + cfg.stop_after)
    loss, last_eval, ckpt_path, per_step = float("nan"), {}, None, cfg.batch_size * cfg.window_size
    from tqdm.auto import tqdm

    n_params = sum(p.numel() for p in model.parameters())
    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and lead), dynamic_ncols=True,
               desc=f"{cfg.backbone} {n_params / 1e6:.2f}M" + (f" x{world} ranks" if world > 1 else ""))
    log_path = metrics_path if lead else os.devnull
    row, logged, plot_said = None, True, [False]

    def plot():
        if not write_plot(run_dir) and not plot_said[0]:
            plot_said[0] = True
            warnings.warn("matplotlib is not installed: no loss.png is written (pip install rwkv-torch[plot] adds "
                          "it)", stacklevel=2)

    with StopSignal() as stop, open(log_path, "a") as log:
        t_last, rate = time.perf_counter(), 0.0
        deadline = math.inf if cfg.time_limit is None else t_last + cfg.time_limit
        while step < end and not any_rank(stop.signum is not None or time.perf_counter() > deadline, world, device):
            plan = next(plans)[lanes]
            batch = make_batch(train_data, plan, cfg.window_size)
            lr = sched.get_last_lr()[0]
            loss, parts, state = train_step(net, opt, train_data, batch, state, cfg, device)
            if world > 1:
                loss, *vals = all_mean([loss, *parts.values()], world, device)
                parts = dict(zip(parts, vals))
            sched.step()
            step += 1
            now = time.perf_counter()
            rate, t_last = per_step / max(now - t_last, 1e-9), now
            row = {"step": step, "loss": loss, "lr": lr, f"{unit}_per_s": rate}
            if len(parts) > 1:
                row.update({f"loss_{k}": v for k, v in parts.items()})
            if lead and val_data is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                last_eval = evaluate(model, val_data, cfg, device)
                row.update(last_eval)
            logged = step % cfg.log_every == 0 or "val_loss" in row or step == end
            if logged:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if lead and "val_loss" in row:
                plot()
            bar.update(1)
            bar.set_postfix({"loss": f"{loss:.4f}", f"{unit}/s": f"{rate:,.0f}",
                             **({"val": f"{last_eval['val_loss']:.4f}"} if last_eval else {})})
            if step % cfg.save_every == 0 and step < end:
                ckpt_path = save(step)
        bar.close()
        if not logged:  # stopped early (time_limit, a signal): the last step is logged too
            log.write(json.dumps(row) + "\n")
            log.flush()
        ckpt_path = save(step)
    interrupted = any_rank(stop.signum is not None, world, device)
    model_dir = None
    if lead:
        plot()
        if data.is_text and cfg.backbone.startswith("rwkv") and not cfg.train_state:
            # the language model itself, for generate/export (LoRA merged into plain weights)
            from ..checkpoints import save as save_model

            backbone = merge_lora(copy.deepcopy(model.backbone)) if has_lora(model.backbone) else model.backbone
            model_dir = str(save_model(backbone, run_dir / "model"))
        if model.state0 is not None:  # the learned initial state: generate --state-in, Stream, the replay policy
            model.state0.as_state(model.backbone.init_state(1)).save(run_dir / "state.safetensors")
    if lead and interrupted:
        name = signal.Signals(stop.signum).name if stop.signum is not None else "a signal on another rank"
        print(f"interrupted by {name} at step {step} of {cfg.steps}; checkpoint {ckpt_path}; resume with: "
              f"rwkv-torch train --resume {run_dir}", flush=True)
    return dict(model_dir=model_dir, step=step, loss=loss, val_loss=last_eval.get("val_loss"), run_dir=str(run_dir),
                checkpoint=str(ckpt_path), interrupted=interrupted, signal=stop.signum, params=n_params, rank=rank,
                world_size=world)
