"""Baselines for ``rwkv-torch train --backbone transformer|lstm|residual-lstm``, with the RWKV backbone's calling
convention: ``forward(x, state, return_sequence=True, return_state=True) -> (out, state)`` and
``init_state(batch_size)``.

States are tuples of tensors with the batch first (the trainer resets and detaches rows generically). The transformer
sees only the current window (its state is empty); the LSTM and the residual LSTM carry ``(h, c)`` like RWKV carries
its state. The residual LSTM is the shape of slippi-ai's default core: per layer a residual LSTM (pre-LayerNorm) then
a residual pre-LayerNorm feed-forward block. ``matched_width`` picks the width that gives about the RWKV model's
parameter count (same budget)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Input(nn.Module):
    """Token embedding (``vocab_size``) or linear projection of frames (``embed_dim``), then LayerNorm."""

    def __init__(self, width: int, embed_dim: int | None, vocab_size: int | None):
        super().__init__()
        self.proj = nn.Embedding(vocab_size, width) if vocab_size else nn.Linear(embed_dim, width)
        self.ln = nn.LayerNorm(width)

    def forward(self, x):
        return self.ln(self.proj(x.long() if isinstance(self.proj, nn.Embedding) else x))


class _Output(nn.Module):
    def __init__(self, width: int, vocab_size: int | None):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False) if vocab_size else None

    def forward(self, h):
        h = self.ln(h)
        return self.head(h) if self.head is not None else h


class _AttentionBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, N]
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.mlp(self.ln2(x)))


class Transformer(nn.Module):
    """Small causal pre-LN transformer (torch SDPA, learned positions up to ``max_len``) over one window."""

    def __init__(self, *, width: int, num_layers: int, num_heads: int, max_len: int, embed_dim: int | None = None,
                 vocab_size: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.max_len, self.output_size = max_len, vocab_size or width
        self.inp = _Input(width, embed_dim, vocab_size)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_AttentionBlock(width, num_heads, dropout) for _ in range(num_layers))
        self.out = _Output(width, vocab_size)

    def init_state(self, batch_size: int = 1, *, device=None, dtype=None) -> tuple:
        return ()

    def forward(self, x, state=(), *, return_sequence=True, return_state=False):
        T = x.shape[1]
        if self.max_len < T:
            raise ValueError(f"transformer baseline takes at most {self.max_len} positions, got {T}")
        h = self.inp(x) + self.pos[:T]
        for block in self.blocks:
            h = block(h)
        out = self.out(h)
        out = out if return_sequence else out[:, -1]
        return (out, ()) if return_state else out


class LSTM(nn.Module):
    """Stacked LSTM with the same input and output layers; state ``(h, c)`` each ``[B, num_layers, width]``."""

    def __init__(self, *, width: int, num_layers: int, embed_dim: int | None = None, vocab_size: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.width, self.num_layers, self.output_size = width, num_layers, vocab_size or width
        self.inp = _Input(width, embed_dim, vocab_size)
        self.lstm = nn.LSTM(width, width, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        self.out = _Output(width, vocab_size)

    def init_state(self, batch_size: int = 1, *, device=None, dtype=None) -> tuple:
        p = self.out.ln.weight
        zeros = torch.zeros(batch_size, self.num_layers, self.width, device=device or p.device, dtype=dtype or p.dtype)
        return zeros, zeros.clone()

    def forward(self, x, state=None, *, return_sequence=True, return_state=False):
        if not state:
            state = self.init_state(x.shape[0], device=x.device)
        h0, c0 = (s.transpose(0, 1).contiguous().to(self.out.ln.weight.dtype) for s in state)
        y, (h, c) = self.lstm(self.inp(x), (h0, c0))
        out = self.out(y)
        out = out if return_sequence else out[:, -1]
        return (out, (h.transpose(0, 1), c.transpose(0, 1))) if return_state else out


class ResidualLSTM(nn.Module):
    """``num_layers`` x (``x + LSTM(LN(x))``, then ``x + MLP(LN(x))``, the MLP 4x wide), the input and output layers
    of the others; state ``(h, c)`` each ``[B, num_layers, width]`` like ``LSTM``."""

    def __init__(self, *, width: int, num_layers: int, embed_dim: int | None = None, vocab_size: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.width, self.num_layers, self.output_size = width, num_layers, vocab_size or width
        self.inp = _Input(width, embed_dim, vocab_size)
        self.ln_rnn = nn.ModuleList(nn.LayerNorm(width) for _ in range(num_layers))
        self.rnn = nn.ModuleList(nn.LSTM(width, width, batch_first=True) for _ in range(num_layers))
        self.ln_ffn = nn.ModuleList(nn.LayerNorm(width) for _ in range(num_layers))
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
                                 for _ in range(num_layers))
        self.drop = nn.Dropout(dropout)
        self.out = _Output(width, vocab_size)

    init_state = LSTM.init_state

    def forward(self, x, state=None, *, return_sequence=True, return_state=False):
        if not state:
            state = self.init_state(x.shape[0], device=x.device)
        dtype = self.out.ln.weight.dtype
        h0, c0 = (s.to(dtype) for s in state)
        y, hs, cs = self.inp(x), [], []
        for i in range(self.num_layers):
            r, (h, c) = self.rnn[i](self.ln_rnn[i](y), (h0[:, i][None].contiguous(), c0[:, i][None].contiguous()))
            y = y + self.drop(r)
            y = y + self.drop(self.ffn[i](self.ln_ffn[i](y)))
            hs.append(h[0])
            cs.append(c[0])
        out = self.out(y)
        out = out if return_sequence else out[:, -1]
        return (out, (torch.stack(hs, 1), torch.stack(cs, 1))) if return_state else out


def build_baseline(kind: str, *, width: int, num_layers: int, head_size: int, max_len: int,
                   embed_dim: int | None = None, vocab_size: int | None = None, dropout: float = 0.0) -> nn.Module:
    """``kind`` is ``"transformer"`` (heads of ``head_size``), ``"lstm"`` or ``"residual-lstm"``."""
    if kind == "transformer":
        heads = max(1, width // head_size)
        return Transformer(width=width, num_layers=num_layers, num_heads=heads, max_len=max_len,
                           embed_dim=embed_dim, vocab_size=vocab_size, dropout=dropout)
    if kind == "lstm":
        return LSTM(width=width, num_layers=num_layers, embed_dim=embed_dim, vocab_size=vocab_size, dropout=dropout)
    if kind == "residual-lstm":
        return ResidualLSTM(width=width, num_layers=num_layers, embed_dim=embed_dim, vocab_size=vocab_size,
                            dropout=dropout)
    raise ValueError(f"unknown baseline {kind!r}; expected 'transformer', 'lstm' or 'residual-lstm'")


def matched_width(kind: str, budget: int, *, head_size: int, **options) -> int:
    """The width (a multiple of ``head_size`` for the transformer, of 8 for the LSTMs) whose parameter count is
    closest to ``budget``. Models are built on the meta device, so this allocates nothing."""
    unit = head_size if kind == "transformer" else 8
    best, best_gap, width = unit, None, unit
    while True:
        with torch.device("meta"):
            n = sum(p.numel() for p in build_baseline(kind, width=width, head_size=head_size, **options).parameters())
        gap = abs(n - budget)
        if best_gap is not None and gap > best_gap:
            return best
        best, best_gap, width = width, gap, width + unit
