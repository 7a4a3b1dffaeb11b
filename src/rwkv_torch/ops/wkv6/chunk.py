"""WKV-6 in chunked parallel form (gated linear attention with a bonus; spec section 5.1), plain PyTorch.

State ``h [K, V]`` (the op's layout). Per chunk of length L, Γ the inclusive cumulative log decay, Γ⁻ = Γ - w::

    A_ij = Σ_c r_i k_j e^{Γ⁻_i - Γ_j}   (j < i),     A_ii = Σ_c r_i u k_i
    o_i  = (r_i ⊙ e^{Γ⁻_i})ᵀ h₀ + Σ_{j<=i} A_ij v_j
    h_L  = e^{Γ_L} ⊙ h₀ + Σ_j (k_j ⊙ e^{Γ_L - Γ_j}) v_jᵀ

Every exponent above is <= 0. RWKV-6's log decay ``-exp(d)`` is unbounded below, so the pair factors are formed by
factorising around the chunk's middle only when the chunk's total |log decay| fits the dtype's exponent range;
otherwise elementwise per pair with the upper triangle masked before exp (exact for any w <= 0).
"""

import torch
import torch.nn.functional as F

from ..wkv7.chunk import _FACTOR_SPAN
from ..wkv7.naive import compute_dtype

DEFAULT_CHUNK_SIZE = 32


def _intra(r, k, u, G, Gm):
    """A [.., L, L]: the strictly-lower pair scores plus the bonus on the diagonal. G, Gm are float64."""
    L, cd = r.shape[-2], r.dtype
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    span = (-G[..., -1, :]).amax().item() if G.numel() else 0.0
    if span <= _FACTOR_SPAN[cd]:
        ref = G[..., L // 2 : L // 2 + 1, :]
        A = (r * (Gm - ref).exp().to(cd)) @ (k * (ref - G).exp().to(cd)).transpose(-1, -2)
    else:
        d = (Gm.unsqueeze(-2) - G.unsqueeze(-3)).masked_fill(~strict[:, :, None], float("-inf")).exp().to(cd)
        A = torch.einsum("...ic,...ijc,...jc->...ij", r, d, k)
    A = torch.where(strict, A, r.new_zeros(()))
    return A + torch.diag_embed((r * u * k).sum(-1))


def wkv6_chunk(r, w, k, v, u, state=None, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """r, w, k, v: [B, T, H, N]; u: [H, N]; state: [B, H, N_k, N_v] or None. Returns (out [B, T, H, N], state)."""
    B, T, H, N = r.shape
    cd = compute_dtype(r.dtype)
    L = int(chunk_size)
    pad = (-T) % L
    # Padding with w = 0 and k = 0 leaves the state unchanged through the tail.
    r, w, k, v = (F.pad(t.to(cd), (0, 0, 0, 0, 0, pad)) for t in (r, w, k, v))
    nc = (T + pad) // L
    r, w, k, v = (t.view(B, nc, L, H, N).permute(0, 3, 1, 2, 4) for t in (r, w, k, v))  # [B, H, nc, L, N]
    u = u.to(cd)[None, :, None, None, :]  # [1, H, 1, 1, N]

    # Cumulative log decays in float64: differences of long fp32 sums would lose digits in every exponent.
    G = w.double().cumsum(-2)
    Gm = G - w.double()
    G_last = G[..., -1:, :]
    Q = _intra(r, k, u, G, Gm) @ v  # intra-chunk part of o: [B, H, nc, L, V]
    P = r * Gm.exp().to(cd)  # o_c = P h + Q
    D = G_last.squeeze(-2).exp().to(cd).unsqueeze(-1)  # [B, H, nc, K, 1]
    R = (k * (G_last - G).exp().to(cd)).transpose(-1, -2) @ v  # h' = D ⊙ h + R: [B, H, nc, K, V]

    h = r.new_zeros(B, H, N, N) if state is None else state.to(cd)
    outs = []
    for c in range(nc):
        outs.append(P[:, :, c] @ h + Q[:, :, c])
        h = D[:, :, c] * h + R[:, :, c]
    out = torch.stack(outs, dim=2).permute(0, 2, 3, 1, 4).reshape(B, nc * L, H, N)[:, :T]
    return out, h
