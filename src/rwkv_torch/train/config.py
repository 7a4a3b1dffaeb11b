"""``TrainConfig``, every option of ``rwkv-torch train``, and ``as_config`` (from a dict or argparse Namespace)."""

import dataclasses
from dataclasses import dataclass

from ..checks import check_device
from ..tokenizer import TOKENIZERS

BACKBONES = ("rwkv7", "rwkv6", "rwkv5", "rwkv4", "transformer", "lstm", "residual-lstm")
CONTROLLER_HEADS = ("autoregressive", "independent")


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
    truncate_bptt: int | None = None  # chunk length (--chunk-len): the window runs in chunks of this many steps
    bptt: str = "chunk"  # across chunks: "chunk" (state carried, gradient cut) or "full" (gradient carried)
    data: str | None = None  # None: the Python standard library sources as byte-level text
    max_bytes: int | None = None
    tokenizer: str = "byte"  # text data as "byte" (vocab 256) or "world" (RWKV World tokens, vocab 65536)
    # Episode data: "autoregressive" (targets in order, each head sees the values before it; the default for .slp
    # replays) or "independent" heads; None: the data's default (task/model.py).
    controller_head: str | None = None
    action_delay: int = 1  # .slp data: predict the input this many frames after the observed state (slippi.replays)
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
    overwrite: bool = False  # out holds another run: delete its files (checkpoints, metrics, model/) first
    # Fine-tuning (train/finetune.py): start from these weights (a native model dir, an official .pth or a run);
    # the architecture comes from them.
    init_from: str | None = None
    lora_rank: int | None = None  # LoRA of this rank on the large projections; everything else frozen
    lora_alpha: float | None = None  # LoRA scale alpha / rank (default alpha = rank: scale 1)
    lora_targets: str | None = None  # comma-separated linear names (default finetune.DEFAULT_LORA_TARGETS)
    train_also: str | None = None  # comma-separated name parts trained besides LoRA / the state (e.g. "ln,head")
    train_state: bool = False  # learn the initial wkv state of every layer (the only trainable tensor by default)

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r}: must be one of {BACKBONES}")
        if self.device is not None:
            check_device(self.device, flag="device", allowed=("cpu", "cuda"))
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r}: must be 'fp32' or 'bf16'")
        for f in ("hidden_size", "num_layers", "head_size", "window_size", "steps", "batch_size", "eval_batches",
                  "save_every", "eval_every", "keep_checkpoints", "log_every"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)!r}: must be >= 1")
        for f in ("stride", "truncate_bptt", "stop_after", "max_bytes"):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)!r}: must be None or >= 1")
        if self.controller_head not in (None, *CONTROLLER_HEADS):
            raise ValueError(f"controller_head={self.controller_head!r}: must be one of {CONTROLLER_HEADS}")
        if self.bptt not in ("chunk", "full"):
            raise ValueError(f"bptt={self.bptt!r}: must be 'chunk' or 'full'")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={self.tokenizer!r}: must be one of {sorted(TOKENIZERS)}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs!r}: must be None or > 0")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError(f"time_limit={self.time_limit!r}: must be None or > 0 seconds")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction!r}: must be in [0, 1)")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank!r}: must be None or >= 1")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r}: must be None or > 0")
        if (self.lora_alpha is not None or self.lora_targets is not None) and self.lora_rank is None:
            raise ValueError("lora_alpha / lora_targets need lora_rank (--lora-rank R)")
        if self.finetune_mode and not self.backbone.startswith("rwkv"):
            raise ValueError(f"LoRA and state tuning are for the RWKV backbones, not {self.backbone} (the baselines "
                             "train from scratch)")
        if self.finetune_mode and self.init_from is None:
            raise ValueError("LoRA, state tuning and --train-also fine-tune trained weights: give --init-from PATH")
        if self.action_delay < 0:
            raise ValueError(f"action_delay={self.action_delay!r}: must be >= 0 frames")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup!r}: must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: must be > 0")

    @property
    def finetune_mode(self) -> bool:
        """LoRA, state tuning or --train-also: most weights frozen, checkpoints hold only the trainable tensors."""
        return self.lora_rank is not None or self.train_state or self.train_also is not None


def as_config(args) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a dict or an argparse Namespace (None values mean the default)."""
    if isinstance(args, TrainConfig):
        return args
    d = dict(args) if isinstance(args, dict) else vars(args)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if isinstance(args, dict) and set(d) - names:
        raise TypeError(f"unknown train option(s) {sorted(set(d) - names)}")
    return TrainConfig(**{k: v for k, v in d.items() if k in names and v is not None})
