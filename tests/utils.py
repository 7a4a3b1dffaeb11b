"""Shared test helpers: error metrics, gradients through a random loss, the varlen (cu_seqlens) harness."""

import pytest
import torch


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Root-mean-square of the difference over that of the reference (0 when both are zero)."""
    ref = ref.detach().double()
    out = out.detach().double()
    num = (ref - out).pow(2).mean().sqrt().item()
    den = ref.pow(2).mean().sqrt().item()
    return num / den if den > 0 else num


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, rtol: float) -> None:
    """Assert relative-RMS error <= rtol and no NaN; the message carries max-abs and rel-RMS error."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: output has NaN"
    assert not torch.isnan(ref).any(), f"{name}: reference has NaN"
    err = rel_rms(ref, out)
    max_abs = (ref.detach().double() - out.detach().double()).abs().max().item() if ref.numel() else 0.0
    assert err <= rtol, f"{name}: rel-RMS {err:.3e} > {rtol:.1e} (max abs diff {max_abs:.3e})"


def needs_c_kernel():
    """A skipif mark for tests of the C recurrence (``backend="recurrent"`` on CPU); builds it on first use."""
    from rwkv_torch.ops import cpu_lib

    return pytest.mark.skipif(not cpu_lib.available(), reason="no C compiler for the CPU kernel here")


def _tensors(state) -> list[torch.Tensor]:
    """A state as a list of tensors: [] for None, [s] for one tensor, the entries of a tuple (WKV-4's aa, bb, pp)."""
    if state is None:
        return []
    return [state] if isinstance(state, torch.Tensor) else list(state)


def grads_of(fn, xs, state=None, *, seed=1, like=None):
    """Run ``fn(*xs, state) -> (out, final)`` and differentiate ``(out * do).sum() + Σ (s * ds).sum()`` over the final
    state's tensors, with ``do``, ``ds`` standard normal from ``seed`` (drawn in float64 in that order, rounded to the
    run's dtypes, or to ``like = (out dtype, state dtype)``: a float64 reference then sees the same rounded weights as
    the run it is compared with).

    ``state`` and ``final`` are a tensor, a tuple of tensors (WKV-4) or None. Returns ``(out, final, grads)``,
    detached, ``final`` in its own structure (a tuple as a list), ``grads`` those of every x, then of the initial
    state's tensors."""
    out, final = fn(*xs, state)
    g = torch.Generator().manual_seed(seed)
    o_dt, s_dt = like or (out.dtype, None)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64).to(o_dt).to(out)
    loss = (out * do).sum()
    for s in _tensors(final):
        ds = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s_dt or s.dtype).to(s)
        loss = loss + (s * ds).sum()
    grads = torch.autograd.grad(loss, [*xs, *_tensors(state)])
    final = final.detach() if isinstance(final, torch.Tensor) else [s.detach() for s in final]
    return out.detach(), final, [x.detach() for x in grads]


def assert_all_close(ref, got, rtol: float, grad_names, state_names=("ht",)) -> None:
    """Two ``grads_of`` results agree: output, each final-state tensor and each gradient (named ``d<name>``)."""
    (ref_o, ref_s, ref_g), (out, st, gs) = ref, got
    assert_close("o", ref_o, out, rtol)
    ref_s, st = _tensors(ref_s), _tensors(st)
    assert len(ref_s) == len(st) <= len(state_names)
    for name, rs, s in zip(state_names, ref_s, st):
        assert_close(name, rs, s, rtol)
    assert len(ref_g) == len(gs) <= len(grad_names)
    for name, rg, g in zip(grad_names, ref_g, gs):
        assert_close(f"d{name}", rg, g, rtol)


def float64_leaves(xs, state):
    """The same values in float64, as fresh leaves needing grad: a reference sees exactly what a kernel saw."""
    leaf = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    return [leaf(x) for x in xs], (None if state is None else leaf(state))


def spans(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each sequence of a cu_seqlens packing."""
    cs = cu_seqlens.tolist()
    return list(zip(cs[:-1], cs[1:]))


def cu_seqlens_of(lens, dtype=torch.int64, device="cpu") -> torch.Tensor:
    """cu_seqlens [S+1] for sequences of the given lengths."""
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=dtype, device=device)


def each_sequence(op, cu_seqlens, n_seq: int, **kwargs):
    """``(*xs, h0) -> (out, ht)``: ``op`` on each sequence of the packing alone (``xs[:n_seq]`` cut along T, the rest,
    e.g. WKV-6's bonus u, shared; ``h0[i]`` its initial state), outputs joined along T and final states along S:
    the reference for one packed call."""

    def run(*args):
        *xs, h0 = args
        outs, states = [], []
        for i, (s, e) in enumerate(spans(cu_seqlens)):
            o, h = op(*(x[:, s:e] for x in xs[:n_seq]), *xs[n_seq:], h0[i : i + 1], **kwargs)
            outs.append(o)
            states.append(h)
        return torch.cat(outs, 1), torch.cat(states, 0)

    return run


def assert_varlen_matches(packed, separate, xs, h0, cu_seqlens, rtol: float, *, grad_names=None, ref_inputs=None,
                          per_sequence: bool = True) -> None:
    """``packed(*xs, h0)``, one call on the cu_seqlens packing, against ``separate`` (``each_sequence``) on
    ``ref_inputs`` (default: the same ``xs, h0``; e.g. their ``float64_leaves``).

    Outputs and final states are compared per sequence (``per_sequence``; an empty sequence checks its state only)
    or over the whole packing. With ``grad_names`` (those of xs, then the initial state), the gradients of every input
    and of each sequence's initial state through the same random loss (``grads_of``; the reference's weights rounded
    to the dtypes of the inputs and the initial state) are compared over the packing; without, both run under
    ``torch.no_grad()``."""
    ref_xs, ref_h0 = ref_inputs or (xs, h0)
    if grad_names is not None:
        got = grads_of(packed, xs, h0)
        ref = grads_of(separate, ref_xs, ref_h0, like=(xs[0].dtype, h0.dtype))
    else:
        with torch.no_grad():
            got, ref = packed(*xs, h0), separate(*ref_xs, ref_h0)
    (out, ht), (ref_o, ref_h) = got[:2], ref[:2]
    assert out.shape == xs[0].shape and ht.shape == ref_h.shape == (cu_seqlens.numel() - 1, *ht.shape[1:])
    if per_sequence:
        for i, (s, e) in enumerate(spans(cu_seqlens)):
            if e > s:  # (assert_close needs elements)
                assert_close(f"o[{i}]", ref_o[:, s:e], out[:, s:e], rtol)
            assert_close(f"ht[{i}]", ref_h[i : i + 1], ht[i : i + 1], rtol)
    else:
        assert_close("o", ref_o, out, rtol)
        assert_close("ht", ref_h, ht, rtol)
    if grad_names is not None:
        assert len(ref[2]) == len(got[2]) == len(grad_names)
        for name, rg, g in zip(grad_names, ref[2], got[2]):
            assert_close(f"d{name}", rg, g, rtol)


def torchrun_train(flags: list, out, nproc: int = 2):
    """``rwkv-torch train FLAGS --out OUT`` under torchrun with ``nproc`` CPU processes (gloo), one thread each;
    returns the finished ``subprocess.CompletedProcess``."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(["src", os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "rwkv_torch.cli", "train", *flags, f"--out={out}", "--device=cpu", "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)


class ReadBacks:
    """Counts device-to-host reads (``.item()``, ``.tolist()``, ``bool(tensor)``: the Tensor methods ``names``)
    while active (``count``)."""

    def __init__(self, monkeypatch, names=("item", "tolist", "__bool__")):
        self.count = 0
        for name in names:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(real))

    def _counting(self, real):
        def wrapper(t, *args, **kwargs):
            self.count += 1
            return real(t, *args, **kwargs)

        return wrapper


def episode_row(ep: dict, t: int) -> tuple:
    """Frame ``t`` of a replay episode as ``Policy.act`` takes it: ``(frame row, {id name: ids})``."""
    return ep["frames"][t], {k[4:]: ep[k][t] for k in ep if k.startswith("ids_")}


def assert_onnx_policy_matches(pol, path, ep: dict, steps: int):
    """The exported policy ``path`` (onnxruntime, state carried through its inputs and outputs) gives ``pol``'s head
    logits on the first ``steps`` frames of ``ep``; returns the last frame's heads."""
    import numpy as np
    import onnxruntime as ort

    from rwkv_torch.export import state_names

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = state_names(pol.model.backbone.config.num_layers)
    flat = [t.numpy() for t in pol.model.init_state(1).flat()]
    for t in range(steps):
        frame, ids = episode_row(ep, t)
        id_row = np.concatenate([np.asarray(ids[s.name]).reshape(-1) for s in pol.model.id_specs])[None]
        outs = sess.run(None, {"frame": frame[None], "ids": id_row.astype(np.int64), **dict(zip(names, flat))})
        heads, flat = outs[0][0], outs[1:]
        want = torch.cat(list(pol.logits(frame, ids).values())).numpy()
        np.testing.assert_allclose(heads, want, rtol=1e-4, atol=1e-4)
    return heads
