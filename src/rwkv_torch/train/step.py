"""One optimizer step and the held-out evaluation: ``train_step``, ``evaluate``, the task loss (with ``L2Wrap`` on
the LM loss) and the carried-state helpers (reset rows at sequence starts, detach between windows)."""

import itertools

import torch
import torch.nn.functional as F

from ..state import RWKVState
from .config import TrainConfig
from .data import Dataset, make_batch, window_plans
from .model import unwrap_model


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


def state_tensors(state) -> list:
    if isinstance(state, RWKVState):
        return state.flat()
    return list(state)


def state_like(template, tensors: list):
    if isinstance(template, RWKVState):
        return RWKVState.from_flat(tensors, template.meta)
    return tuple(tensors)


def _reset_rows(state, fresh, reset: torch.Tensor):
    """Rows where ``reset`` is True start a new sequence (the fresh state); the others keep theirs, detached."""
    out = []
    for s, f in zip(state_tensors(state), state_tensors(fresh)):
        r = reset.view(-1, *[1] * (s.dim() - 1))
        out.append(torch.where(r, f.to(s.dtype), s.detach()))
    return state_like(fresh, out)


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
    state = _reset_rows(state, unwrap_model(model).init_state(x.shape[0], device=device), reset)
    model.train()
    opt.zero_grad(set_to_none=True)
    T = x.shape[1]
    span = cfg.truncate_bptt or T
    if cfg.bptt == "full" and span < T:
        total, parts, state = _full_bptt(model, data, x, ys, state, cfg, device, span)
        return _finish(model, opt, cfg, total, parts, state)
    total, parts = 0.0, {}
    for a in range(0, T, span):
        b = min(T, a + span)
        with _autocast(cfg, device):
            outs, state = model(x[:, a:b], state, targets={k: v[:, a:b] for k, v in ys.items()})
        loss, p = task_loss(outs, {k: v[:, a:b] for k, v in ys.items()}, data.targets, data.is_text)
        (loss * ((b - a) / T)).backward()
        state = state_like(state, [t.detach() for t in state_tensors(state)])
        total += loss.item() * (b - a) / T
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v.item() * (b - a) / T
    return _finish(model, opt, cfg, total, parts, state)


def _finish(model, opt, cfg: TrainConfig, total: float, parts: dict, state) -> tuple:
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return total, parts, state


def _full_bptt(model, data: Dataset, x, ys: dict, state, cfg: TrainConfig, device, span: int) -> tuple:
    """The window in chunks of ``span`` with the gradient carried through the state across chunks (``--bptt full``):
    each chunk runs under activation checkpointing, so memory holds one chunk's activations and the states at the
    chunk boundaries, and the backward recomputes one chunk at a time. Gradients equal one forward over the
    window."""
    from torch.utils.checkpoint import checkpoint

    T, names = x.shape[1], [t.name for t in data.targets]
    meta = state

    def chunk(xs, ys_chunk, *flat):
        with _autocast(cfg, device):
            outs, st = model(xs, state_like(meta, list(flat)), targets=dict(zip(names, ys_chunk)))
        loss, p = task_loss(outs, dict(zip(names, ys_chunk)), data.targets, data.is_text)
        return (loss, torch.stack([p[n].detach() for n in names]), *state_tensors(st))

    total, parts_sum, flat = 0.0, torch.zeros(len(names)), state_tensors(state)
    for a in range(0, T, span):
        b = min(T, a + span)
        loss, p, *flat = checkpoint(chunk, x[:, a:b], [ys[n][:, a:b] for n in names], *flat, use_reentrant=False)
        total = total + loss * ((b - a) / T)
        parts_sum += p.float().cpu() * ((b - a) / T)
    total.backward()
    state = state_like(meta, [t.detach() for t in flat])
    return total.item(), dict(zip(names, parts_sum.tolist())), state


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
            outs, state = model(x, state, targets=ys)
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
