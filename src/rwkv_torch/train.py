"""The training loop: ``train(config)`` plus helpers. Single process, CPU or one GPU.

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

import dataclasses
import itertools
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .data import Dataset, check_window, load_data, make_batch, split_by_sequence, window_counts, window_plans
from .state import RWKVState
from .tokenizer import TOKENIZERS

BACKBONES = ("rwkv7", "rwkv6", "rwkv5", "rwkv4", "transformer", "lstm")
CHECKPOINT_FORMAT = "rwkv-torch-train"
# Fields a resumed run may change; everything else comes from the checkpoint.
RESUME_OVERRIDES = ("steps", "stop_after", "time_limit", "device", "eval_every", "save_every", "log_every",
                    "keep_checkpoints", "progress", "gradient_checkpoint", "compile")
LR_SCALE = {"att.w0": 2.0, "att.time_decay": 2.0, "att.time_first": 3.0}


@dataclass
class TrainConfig:
    """Every option of ``rwkv-torch train`` (the CLI flags use dashes)."""

    backbone: str = "rwkv7"
    hidden_size: int = 256
    num_layers: int = 6
    head_size: int = 64
    window_size: int = 256
    stride: int | None = None  # None: window_size (stateful)
    dropout: float = 0.0
    precision: str = "fp32"
    truncate_bptt: int | None = None
    data: str | None = None  # None: the Python standard library sources as byte-level text
    max_bytes: int | None = None
    tokenizer: str = "byte"  # text data as "byte" (vocab 256) or "world" (RWKV World tokens, vocab 65536)
    val_fraction: float = 0.05
    out: str | None = None  # None: runs/<time>
    steps: int = 1000
    epochs: float | None = None  # set: steps = ceil(epochs * training windows / batch_size) instead of `steps`
    stop_after: int | None = None
    time_limit: float | None = None  # seconds of training in this invocation; then stop with a checkpoint
    batch_size: int = 16
    lr: float = 6e-4
    lr_final: float = 1e-5
    warmup: int = 50
    weight_decay: float = 0.0
    adam_eps: float = 1e-18
    grad_clip: float = 1.0
    seed: int = 0
    resume: str | None = None
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    device: str | None = None
    progress: bool = True
    gradient_checkpoint: bool = False
    # torch.compile the model for the training steps (the first steps compile: a minute or two on CPU); a string
    # names the torch.compile backend (default "inductor").
    compile: bool | str = False

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r}: must be one of {BACKBONES}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r}: must be 'fp32' or 'bf16'")
        for f in ("hidden_size", "num_layers", "head_size", "window_size", "steps", "batch_size", "eval_batches",
                  "save_every", "eval_every", "keep_checkpoints", "log_every"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)!r}: must be >= 1")
        for f in ("stride", "truncate_bptt", "stop_after"):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)!r}: must be None or >= 1")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={self.tokenizer!r}: must be one of {sorted(TOKENIZERS)}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs!r}: must be None or > 0")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError(f"time_limit={self.time_limit!r}: must be None or > 0 seconds")


def as_config(args) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a dict or an argparse Namespace (None values mean the default)."""
    if isinstance(args, TrainConfig):
        return args
    d = dict(args) if isinstance(args, dict) else vars(args)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if isinstance(args, dict) and set(d) - names:
        raise TypeError(f"unknown train option(s) {sorted(set(d) - names)}")
    return TrainConfig(**{k: v for k, v in d.items() if k in names and v is not None})


class TaskModel(nn.Module):
    """A backbone (``[B, T, in] -> [B, T, width]``) with one linear head per episode target; a text model uses the
    backbone's own LM head. ``forward(x, state) -> ({target: out [B, T, size]}, state)``."""

    def __init__(self, backbone: nn.Module, targets: list, width: int, lm: bool):
        super().__init__()
        self.backbone, self.lm = backbone, lm
        self.heads = nn.ModuleDict() if lm else nn.ModuleDict({t.name: nn.Linear(width, t.size) for t in targets})
        self.target_names = [t.name for t in targets]

    def init_state(self, batch_size: int, device=None):
        return self.backbone.init_state(batch_size, device=device)

    def forward(self, x, state):
        h, state = self.backbone(x, state, return_sequence=True, return_state=True)
        if self.lm:
            return {self.target_names[0]: h}, state
        return {name: head(h) for name, head in self.heads.items()}, state


def build_model(cfg: TrainConfig, data: Dataset) -> TaskModel:
    """The backbone named by ``cfg.backbone`` for ``data``; baselines get about the RWKV model's parameter count."""
    import rwkv_torch as rt

    torch.manual_seed(cfg.seed)
    io = dict(vocab_size=data.vocab_size) if data.is_text else dict(embed_dim=data.embed_dim)
    rwkv = dict(hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, head_size=cfg.head_size, dropout=cfg.dropout,
                **io)
    if cfg.backbone.startswith("rwkv"):
        backbone = rt.build(version=int(cfg.backbone[4:]), seed=cfg.seed, **rwkv)
        width = cfg.hidden_size
    else:
        from .baselines import build_baseline, matched_width

        opts = dict(num_layers=cfg.num_layers, head_size=cfg.head_size, max_len=cfg.window_size,
                    dropout=cfg.dropout, **io)
        width = matched_width(cfg.backbone, rt.param_count(**rwkv), **opts)
        backbone = build_baseline(cfg.backbone, width=width, **opts)
    return TaskModel(backbone, data.targets, width, data.is_text)


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list:
    """Adam groups of the official recipe: lr scale by name (``LR_SCALE``), decay on 2-D ``.weight`` only."""
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((s for suffix, s in LR_SCALE.items() if name.endswith(suffix)), 1.0)
        decay = weight_decay if p.dim() >= 2 and name.endswith(".weight") else 0.0
        groups.setdefault((scale, decay), []).append(p)
    return [dict(params=ps, lr=lr * s, weight_decay=d) for (s, d), ps in groups.items()]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier on each group's lr: cosine from 1 to ``lr_final / lr`` over ``steps``, times the warm-up."""
    final = min(1.0, cfg.lr_final / cfg.lr)
    progress = min(1.0, step / max(1, cfg.steps))
    factor = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor * (0.01 + 0.99 * step / cfg.warmup if step < cfg.warmup else 1.0)


class L2Wrap(torch.autograd.Function):
    """The official RWKV LM loss wrapper (spec 4.7): identity forward; backward adds ``1e-4 / (B*T) * max logit``
    to the gradient of each position's arg-max logit, which keeps the logits from drifting upwards."""

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        top, ids = logits.max(dim=-1, keepdim=True)
        return grad, torch.zeros_like(logits).scatter_(-1, ids, top * factor)


def task_loss(outs: dict, ys: dict, targets: list, lm: bool) -> tuple:
    """``(total loss, {target: float})``: cross-entropy, BCE-with-logits or MSE per target, summed."""
    total, parts = 0.0, {}
    for t in targets:
        o, y = outs[t.name].float(), ys[t.name]
        if t.kind == "categorical":
            loss = F.cross_entropy(o.reshape(-1, t.size), y.reshape(-1))
            if lm:
                loss = L2Wrap.apply(loss, outs[t.name])
        elif t.kind == "bernoulli":
            loss = F.binary_cross_entropy_with_logits(o, y)
        else:
            loss = F.mse_loss(o, y)
        parts[t.name] = loss
        total = total + loss
    return total, parts


def _state_tensors(state) -> list:
    if isinstance(state, RWKVState):
        return [*state.shift_att, *state.shift_ffn, *state.wkv]
    return list(state)


def _state_like(template, tensors: list):
    if isinstance(template, RWKVState):
        L = template.num_layers
        return RWKVState(tensors[:L], tensors[L:2 * L], tensors[2 * L:], dict(template.meta))
    return tuple(tensors)


def _reset_rows(state, fresh, reset: torch.Tensor):
    """Rows where ``reset`` is True start a new sequence (the fresh state); the others keep theirs, detached."""
    out = []
    for s, f in zip(_state_tensors(state), _state_tensors(fresh)):
        r = reset.view(-1, *[1] * (s.dim() - 1))
        out.append(torch.where(r, f.to(s.dtype), s.detach()))
    return _state_like(fresh, out)


def _to_tensors(data: Dataset, batch: tuple, device) -> tuple:
    x, ys, reset = batch
    x = torch.from_numpy(x).to(device)
    x = x.long() if data.is_text else x
    ys = {t.name: torch.from_numpy(ys[t.name]).to(device) for t in data.targets}
    ys = {k: v.long() if data.is_text else v for k, v in ys.items()}
    return x, ys, torch.from_numpy(reset).to(device)


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def train_step(model, opt, data: Dataset, batch: tuple, state, cfg: TrainConfig, device) -> tuple:
    """One optimizer step over one window (split into ``truncate_bptt`` spans); returns (loss, parts, state)."""
    x, ys, reset = _to_tensors(data, batch, device)
    state = _reset_rows(state, _unwrap(model).init_state(x.shape[0], device=device), reset)
    model.train()
    opt.zero_grad(set_to_none=True)
    T = x.shape[1]
    span = cfg.truncate_bptt or T
    total, parts = 0.0, {}
    for a in range(0, T, span):
        b = min(T, a + span)
        with _autocast(cfg, device):
            outs, state = model(x[:, a:b], state)
        loss, p = task_loss(outs, {k: v[:, a:b] for k, v in ys.items()}, data.targets, data.is_text)
        (loss * ((b - a) / T)).backward()
        state = _state_like(state, [t.detach() for t in _state_tensors(state)])
        total += loss.item() * (b - a) / T
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v.item() * (b - a) / T
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return total, parts, state


@torch.no_grad()
def evaluate(model, data: Dataset, cfg: TrainConfig, device) -> dict:
    """Mean loss over ``eval_batches`` stateful batches of held-out sequences (the same batches every call)."""
    model.eval()
    lengths = [len(s) for s in data.sequences]
    plans = window_plans(lengths, cfg.window_size, cfg.stride or cfg.window_size, cfg.batch_size, cfg.seed + 1)
    state = model.init_state(cfg.batch_size, device=device)
    total, parts, acc = 0.0, {}, {}
    for plan in itertools.islice(plans, cfg.eval_batches):
        x, ys, reset = _to_tensors(data, make_batch(data, plan, cfg.window_size), device)
        state = _reset_rows(state, model.init_state(x.shape[0], device=device), reset)
        with _autocast(cfg, device):
            outs, state = model(x, state)
        loss, p = task_loss(outs, ys, data.targets, data.is_text)
        total += loss.item() / cfg.eval_batches
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v.item() / cfg.eval_batches
        for t in data.targets:
            if t.kind == "categorical":
                hit = (outs[t.name].argmax(-1) == ys[t.name]).float().mean().item()
                acc[t.name] = acc.get(t.name, 0.0) + hit / cfg.eval_batches
    out = {"val_loss": total}
    if len(parts) > 1:
        out.update({f"val_loss_{k}": v for k, v in parts.items()})
    out.update({f"val_acc_{k}": v for k, v in acc.items()})
    return out


def save_checkpoint(run_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Write ``ckpt-<step>.pt`` atomically (temp file + os.replace) and keep only the newest ``keep``."""
    path = run_dir / f"ckpt-{step:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    for old in sorted(run_dir.glob("ckpt-*.pt"))[:-keep]:
        old.unlink()
    return path


def find_checkpoint(path) -> Path:
    """A checkpoint file, or the newest ``ckpt-*.pt`` in a run directory."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("ckpt-*.pt"))
        if not found:
            raise ValueError(f"{path}: no ckpt-*.pt checkpoint to resume from")
        return found[-1]
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint")
    return path


def _resume_config(cfg: TrainConfig, given: dict) -> tuple:
    ckpt_path = find_checkpoint(cfg.resume)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{ckpt_path}: not an rwkv-torch training checkpoint")
    saved = dict(ckpt["config"])
    saved.update({k: v for k, v in given.items() if k in RESUME_OVERRIDES and v is not None})
    saved["stop_after"] = given.get("stop_after")  # limits of the earlier invocation, not of the run
    saved["time_limit"] = given.get("time_limit")
    saved.update(resume=str(ckpt_path), out=str(ckpt_path.parent))
    return TrainConfig(**saved), ckpt


def _write_plot(run_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)


def _unwrap(model):
    """The model inside ``torch.compile`` and DistributedDataParallel wrappers (or the model itself)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _init_distributed(cfg: TrainConfig) -> tuple:
    """``(rank, world_size, device, created)``: joins the torchrun process group when ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg.device is None and torch.cuda.is_available() or (cfg.device or "").startswith("cuda")
    if world == 1:
        return 0, 1, torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")), False
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, created


def _all_mean(values: list, world: int, device) -> list:
    """The mean over ranks of a list of floats (one all-reduce)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def _any_rank(flag: bool, world: int, device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gather_lanes(tensors: list, world: int) -> list:
    """Each rank's ``[B/world, ...]`` state tensors -> the full ``[B, ...]`` tensors, lanes in rank order."""
    if world == 1:
        return [t.detach().cpu() for t in tensors]
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.detach().contiguous())
        out.append(torch.cat(parts).cpu())
    return out


class _StopSignal:
    """SIGINT/SIGTERM set a flag the loop checks after each step (a second SIGINT interrupts at once)."""

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(args_or_config) -> dict:
    """Train a model; see ``TrainConfig`` and ``rwkv-torch train --help``.

    Writes to the run directory ``out``: ``config.json``, ``metrics.jsonl`` (one JSON object per logged step with
    ``step``, ``loss``, ``lr``, ``tokens_per_s`` and, at eval steps, ``val_loss``), ``loss.png`` when matplotlib is
    installed, ``ckpt-<step>.pt`` checkpoints (the newest ``keep_checkpoints``) and, for an RWKV language model,
    ``model/`` (``rt.save`` format: ``rt.load``, ``rwkv-torch generate --model``). Returns a summary dict with
    ``step``, ``loss``, ``val_loss``, ``run_dir``, ``checkpoint``, ``model_dir`` and ``interrupted``.
    """
    given = dict(args_or_config) if isinstance(args_or_config, dict) else (
        {} if isinstance(args_or_config, TrainConfig) else vars(args_or_config))
    cfg, ckpt = as_config(args_or_config), None
    if isinstance(args_or_config, TrainConfig):
        given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if given.get("epochs") is not None and given.get("steps") is not None:
        raise ValueError("give steps or epochs, not both")
    if cfg.resume:
        cfg, ckpt = _resume_config(cfg, given)
    rank, world, device, created_group = _init_distributed(cfg)
    try:
        return _train(cfg, ckpt, rank, world, device)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ckpt, rank: int, world: int, device) -> dict:
    lead = rank == 0
    run_dir = Path(cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    data = load_data(cfg.data, cfg.max_bytes, cfg.tokenizer)
    check_window(data, cfg.window_size)
    train_data, val_data = split_by_sequence(data, cfg.val_fraction, cfg.seed)
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
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.99),
                            eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    lengths = [len(s) for s in train_data.sequences]
    plans = window_plans(lengths, cfg.window_size, cfg.stride or cfg.window_size, cfg.batch_size, cfg.seed)
    lanes = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)  # this rank's batch rows
    state = model.init_state(lanes.stop - lanes.start, device=device)
    step = 0
    metrics_path = run_dir / "metrics.jsonl"
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        ranks_rng = ckpt.get("rng_cpu_ranks")
        same_world = ranks_rng is not None and len(ranks_rng) == world
        torch.set_rng_state(ranks_rng[rank] if same_world else ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt["rng_cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        state = _state_like(state, [t[lanes].to(device) for t in ckpt["carry"]])
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
        carry = _gather_lanes(_state_tensors(state), world)
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, torch.get_rng_state())
        if not lead:
            return None
        payload = dict(format=CHECKPOINT_FORMAT, format_version=1, step=step, config=dataclasses.asdict(cfg),
                       targets=[dataclasses.asdict(t) for t in data.targets], embed_dim=data.embed_dim,
                       vocab_size=data.vocab_size, model=model.state_dict(), optimizer=opt.state_dict(),
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
    with _StopSignal() as stop, open(log_path, "a") as log:
        t_last, rate = time.perf_counter(), 0.0
        deadline = math.inf if cfg.time_limit is None else t_last + cfg.time_limit
        while step < end and not _any_rank(stop.signum is not None or time.perf_counter() > deadline, world, device):
            plan = next(plans)[lanes]
            batch = make_batch(train_data, plan, cfg.window_size)
            lr = sched.get_last_lr()[0]
            loss, parts, state = train_step(net, opt, train_data, batch, state, cfg, device)
            if world > 1:
                loss, *vals = _all_mean([loss, *parts.values()], world, device)
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
            if step % cfg.log_every == 0 or "val_loss" in row or step == end:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if lead and "val_loss" in row:
                _write_plot(run_dir)
            bar.update(1)
            bar.set_postfix({"loss": f"{loss:.4f}", f"{unit}/s": f"{rate:,.0f}",
                             **({"val": f"{last_eval['val_loss']:.4f}"} if last_eval else {})})
            if step % cfg.save_every == 0 and step < end:
                ckpt_path = save(step)
        bar.close()
        ckpt_path = save(step)
    interrupted = _any_rank(stop.signum is not None, world, device)
    model_dir = None
    if lead:
        _write_plot(run_dir)
        if data.is_text and cfg.backbone.startswith("rwkv"):  # the language model itself, for generate/export
            from .checkpoints import save as save_model

            model_dir = str(save_model(model.backbone, run_dir / "model"))
    return dict(model_dir=model_dir, step=step, loss=loss, val_loss=last_eval.get("val_loss"), run_dir=str(run_dir),
                checkpoint=str(ckpt_path), interrupted=interrupted, params=n_params, rank=rank, world_size=world)
