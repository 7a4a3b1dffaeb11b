"""torchrun / DDP: joining the process group, and the collectives the loop needs (mean and any over ranks, the
carried state of every lane gathered for a checkpoint)."""

import os

import torch
import torch.distributed as dist

from .config import TrainConfig


def init_distributed(cfg: TrainConfig) -> tuple:
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


def all_mean(values: list, world: int, device) -> list:
    """The mean over ranks of a list of floats (one all-reduce)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def any_rank(flag: bool, world: int, device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_lanes(tensors: list, world: int) -> list:
    """Each rank's ``[B/world, ...]`` state tensors -> the full ``[B, ...]`` tensors, lanes in rank order."""
    if world == 1:
        # own, contiguous copies: a carried state is often a view of a big activation (torch.save writes it whole)
        return [t.detach().cpu().clone(memory_format=torch.contiguous_format) for t in tensors]
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.detach().contiguous())
        out.append(torch.cat(parts).cpu())
    return out
