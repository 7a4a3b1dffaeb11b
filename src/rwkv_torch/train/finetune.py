"""Fine-tuning: start from trained weights (``--init-from``), LoRA on the large projections (``--lora-rank``),
state tuning (``--train-state``), and merging LoRA back into plain weights (``merge_lora``, ``rwkv-torch merge``).

LoRA: each targeted ``nn.Linear`` ``W`` becomes ``LoRALinear``: ``y = W x + (alpha / r) B A x`` with ``A`` ``[r, in]``
(Kaiming-uniform, as the LoRA paper and peft) and ``B`` ``[out, r]`` zeros, so the model starts exactly at the loaded
weights (no jump, no NaN at step 0) and only ``A``, ``B`` (and what ``--train-also`` names) train. ``merge_lora``
replaces each ``LoRALinear`` with the ``nn.Linear`` of weight ``W + (alpha / r) B A``.

State tuning: ``InitialState`` holds one trainable wkv state per layer (``[H, N, N]``, zeros at the start, i.e. the
model's own start); the task model starts every sequence from it instead of from zeros, so the gradient of the
initial state that the WKV ops return (``h0``, in every backend) trains it while every weight stays frozen. The
result is an ``RWKVState`` (batch 1) that ``generate --state-in``, ``Stream`` and the replay policy load.
"""

import dataclasses

from ..task import load_init_weights
from ..task.lora import (  # noqa: F401 (the fine-tuning pieces, re-exported)
    DEFAULT_LORA_TARGETS,
    LoRALinear,
    apply_lora,
    freeze_for_finetune,
    has_lora,
    merge_lora,
    trainable_state_dict,
)
from ..task.model import InitialState  # noqa: F401

ARCHITECTURE = ("backbone", "hidden_size", "num_layers", "head_size")


def init_config(cfg, given: dict):
    """``cfg`` with the architecture of the ``init_from`` weights (backbone version, width, depth, head size, and a
    text model's tokenizer); a flag the user gave (``given``, None meaning not given) that contradicts them raises
    ValueError naming both."""
    from ..tokenizer import TOKENIZER_BY_VOCAB

    kind, loaded = load_init_weights(cfg.init_from)
    if kind == "run":
        arch = {k: loaded["config"][k] for k in ARCHITECTURE}
        tokenizer = loaded["config"].get("tokenizer") if loaded.get("vocab_size") else None
        if not loaded.get("vocab_size"):  # its heads too: a run from before --controller-head has independent ones
            arch["controller_head"] = loaded["config"].get("controller_head") or "independent"
    else:
        c = loaded.config
        arch = dict(backbone=f"rwkv{c.version}", hidden_size=c.hidden_size, num_layers=c.num_layers,
                    head_size=c.head_size)
        tokenizer = TOKENIZER_BY_VOCAB.get(c.vocab_size) if c.vocab_size else None
    if tokenizer is not None:  # a text model keeps its tokenizer
        arch["tokenizer"] = tokenizer
    for k, v in arch.items():
        if given.get(k) is not None and given[k] != v:
            raise ValueError(f"--{k.replace('_', '-')} {given[k]} contradicts --init-from {cfg.init_from}, which "
                             f"has {k.replace('_', ' ')} {v}")
    return dataclasses.replace(cfg, **arch)
