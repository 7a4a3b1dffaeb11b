"""LoRA on the large projections and the frozen/trainable split of a fine-tune.

Each targeted ``nn.Linear`` ``W`` becomes ``LoRALinear``: ``y = W x + (alpha / r) B A x`` with ``A`` ``[r, in]``
(Kaiming-uniform, as the LoRA paper and peft) and ``B`` ``[out, r]`` zeros, so the model starts exactly at the loaded
weights (no jump, no NaN at step 0) and only ``A``, ``B`` (and what ``--train-also`` names) train. ``merge_lora``
replaces each ``LoRALinear`` with the ``nn.Linear`` of weight ``W + (alpha / r) B A``.
"""

import math

import torch
import torch.nn as nn

# The large projections of the blocks, by the last part of their name (every version: RWKV-4's and RWKV-5/6's
# receptance/key/value/output, RWKV-5/6's gate, the channel mix's key/value/receptance).
DEFAULT_LORA_TARGETS = ("att.receptance", "att.key", "att.value", "att.gate", "att.output", "ffn.key", "ffn.value",
                        "ffn.receptance")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha / rank) B A``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scale = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ (self.lora_B.t() * self.scale).to(x.dtype)

    def merged(self) -> nn.Linear:
        """The plain ``nn.Linear`` this module computes."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.double() @ self.lora_A.double()) * self.scale
            lin.weight.copy_((self.base.weight.double() + delta).to(lin.weight.dtype))
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=DEFAULT_LORA_TARGETS) -> list[str]:
    """Wrap every ``nn.Linear`` of ``model`` whose name ends with one of ``targets`` in ``LoRALinear``; returns the
    wrapped names. Raises ValueError when nothing matches (a target list for another architecture)."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        have = sorted({n.split(".", 2)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"--lora-targets {','.join(targets)}: no linear layer of the model matches (its linear "
                         f"layers: {', '.join(have)})")
    for n in names:
        _replace(model, n, LoRALinear(model.get_submodule(n), rank, alpha))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` in ``model`` (in place) with its merged ``nn.Linear``; returns the model."""
    for n in [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        _replace(model, n, model.get_submodule(n).merged())
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def freeze_for_finetune(model: nn.Module, train_also: tuple = (), everything: bool = False) -> list[str]:
    """``requires_grad`` for the fine-tuning mode: all parameters when ``everything`` (full fine-tuning), else only
    LoRA factors, the initial state and parameters whose name contains one of ``train_also``. Returns the trainable
    names; raises ValueError when nothing would train."""
    names = []
    for n, p in model.named_parameters():
        train = everything or ".lora_" in n or n.startswith("state0.") or any(s in n for s in train_also)
        p.requires_grad_(train)
        if train:
            names.append(n)
    if not names:
        raise ValueError("nothing to train: give --lora-rank, --train-state or --train-also NAMES")
    return names


def trainable_state_dict(model: nn.Module) -> dict:
    """Only the trainable tensors (what a LoRA or state-tuning checkpoint needs beside its ``init_from`` weights)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in keep}
