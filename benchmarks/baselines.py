"""The best a PyTorch user could write without s2h's kernels: one baseline module for the benchmarks
and tests (issue 18).

For each op, the **best eager** version, written as a PyTorch expert would: vectorised over groups
(no Python loop, no host sync), gradients in closed form where they exist (a small
``torch.autograd.Function`` that saves what backward needs, so nothing is recomputed), logits'
softmaxes taken once. ``tests/kernels/test_baselines.py`` checks each one equal to
``s2h_kernels.reference`` in values and gradients.

Domain: finite logits (the references also handle ``-inf`` logits and underflowing probabilities
with a double ``where``; an expert writing for a training loop with finite logits would not pay for
that, so neither do these). fp32/fp64 inputs.

The **compiled** baselines are ``torch.compile`` (inductor, default mode) of the reference and of
the best eager function: :func:`compiled`. The benchmarks exclude the compile time (the first
calls, outside the timed region) and report it: :func:`compile_seconds`.

``python benchmarks/baselines.py [--threads 1 2] [--rounds 15]`` measures every op's fused /
baseline ratios interleaved in one process (see :func:`interleaved`) and prints the markdown of
benchmarks/results/baselines_cpu.md.
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# channel_masks
# ----------------------------------------------------------------------------------------------


class MaskLayout:
    """Index tensors for the padded (G, n_max) layout of the packed buckets, built once per offsets
    (they depend on the architecture only, as an expert would precompute them).

    Each group's buckets are stored **reversed** in its row (bucket n-1 first) and padded with -inf
    at the end, so the reverse cumsum ``w_j = sum_{k>=j} p_k`` is a plain ``cumsum`` along the row.
    """

    def __init__(self, offsets: Sequence[int], divisors: Sequence[int] | None, device):
        off = [int(o) for o in offsets]
        sizes = [b - a for a, b in zip(off[:-1], off[1:])]
        G, n_max, N = len(sizes), max(sizes), off[-1]
        div = [1] * G if divisors is None else [int(d) for d in divisors]
        gather = torch.full((G, n_max), N, dtype=torch.int64)  # N: the -inf sentinel after u
        for g, (a, n) in enumerate(zip(off[:-1], sizes)):
            gather[g, :n] = torch.arange(a + n - 1, a - 1, -1)
        # position of bucket i (packed index) in the flattened padded layout
        pos = torch.empty(N, dtype=torch.int64)
        pos[gather[gather < N]] = torch.nonzero((gather < N).flatten()).flatten()
        j = torch.arange(n_max).expand(G, n_max)
        n = torch.tensor(sizes)[:, None]
        self.G, self.n_max, self.N = G, n_max, N
        self.gather = gather.flatten().to(device)
        self.valid = (j < n).to(device)
        # sum_j w_j = sum_k p_k (k + 1) over buckets k; in the reversed row, bucket k sits at n-1-k
        self.weights = (n - j).clamp(min=0).to(torch.float32).to(device)
        self.n = torch.tensor(sizes, dtype=torch.float32, device=device)
        self.d = torch.tensor(div, dtype=torch.float32, device=device)
        self.d_int = torch.tensor(div, dtype=torch.int64, device=device)
        self.n_int = torch.tensor(sizes, dtype=torch.int64, device=device)
        self.unit = all(d == 1 for d in div)
        self.bucket_pos = pos.to(device)
        self.chan_bucket = torch.repeat_interleave(torch.arange(N), torch.tensor(div).repeat_interleave(
            torch.tensor(sizes))).to(device)
        # flat (segmented) form: group of each bucket, 1-based index within its group, group ends
        self.seg = torch.repeat_interleave(torch.arange(G), torch.tensor(sizes)).to(device)
        self.local1 = (torch.arange(N) - torch.tensor(off[:-1]).repeat_interleave(torch.tensor(sizes)) + 1
                       ).to(torch.float32).to(device)
        self.ends = torch.tensor(off[1:], dtype=torch.int64, device=device)
        # channel -> position in the padded layout (a bucket repeated d times)
        if self.unit:
            self.chan_pos = pos.to(device)
        else:
            self.chan_pos = torch.repeat_interleave(pos, torch.tensor(div).repeat_interleave(torch.tensor(sizes))
                                                    ).to(device)


@functools.lru_cache(maxsize=64)
def _layout(offsets: tuple, divisors: tuple | None, device: str) -> MaskLayout:
    return MaskLayout(offsets, divisors, torch.device(device))


def mask_layout(u: torch.Tensor, offsets, divisors=None) -> MaskLayout:
    off = tuple(int(o) for o in (offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets))
    div = None if divisors is None else tuple(int(d) for d in (divisors.tolist() if isinstance(divisors, torch.Tensor)
                                                                else divisors))
    return _layout(off, div, str(u.device))


def _masks_forward(u: torch.Tensor, L: MaskLayout, temperature: float, hard_width: str, TIE_RTOL: float = 1e-5):
    """(w, E, keep, p_rev) with everything vectorised; p_rev (G, n_max) is softmax in reversed rows."""
    dt = torch.promote_types(u.dtype, torch.float32)
    ext = torch.cat([u.to(dt) / temperature, u.new_full((1,), float("-inf"), dtype=dt)])
    p = torch.softmax(ext.index_select(0, L.gather).view(L.G, L.n_max), dim=1)
    w_rev = torch.cumsum(p, dim=1)                                  # w of bucket n-1-j at column j
    s = (p * L.weights.to(dt)).sum(1)                               # sum_j w_j per group
    E = L.d.to(dt) * s
    if hard_width == "threshold":
        t = (s / L.n.to(dt))[:, None] * (1 - TIE_RTOL)
        kb = ((w_rev >= t) & L.valid).sum(1)
    else:
        kb = torch.ceil(s - TIE_RTOL).nan_to_num(1.0).to(torch.int64)
    keep = torch.minimum(kb.clamp(min=1), L.n_int) * L.d_int
    w = w_rev.flatten().index_select(0, L.chan_pos)
    return w, E, keep, p


class _MasksFn(torch.autograd.Function):
    """Closed-form backward: with q the cotangent of the padded w_rev (channels summed per bucket),
    the adjoint of cumsum is the reverse cumsum (row total minus the exclusive cumsum), E adds
    d * weights * gE, and softmax's backward is p * (g - <p, g>) / T."""

    @staticmethod
    def forward(ctx, u, L, temperature, hard_width):
        w, E, keep, p = _masks_forward(u, L, temperature, hard_width)
        ctx.save_for_backward(p)
        ctx.L, ctx.T, ctx.dtype = L, temperature, u.dtype
        ctx.mark_non_differentiable(keep)
        return w.to(u.dtype), E.to(u.dtype), keep

    @staticmethod
    def backward(ctx, gw, gE, _gk):
        (p,) = ctx.saved_tensors
        L = ctx.L
        dt = p.dtype
        if gw is None:
            q = p.new_zeros(L.G, L.n_max)
        else:  # channels summed per bucket, then gathered into the padded rows (a zero at the pads)
            gb = gw.to(dt) if L.unit else p.new_zeros(L.N).index_add_(0, L.chan_bucket, gw.to(dt))
            q = torch.cat([gb, gb.new_zeros(1)]).index_select(0, L.gather).view(L.G, L.n_max)
        g = q.sum(1, keepdim=True) - q.cumsum(1) + q                  # sum_{j >= k} q_j
        if gE is not None:
            g = g + (L.d.to(dt) * gE.to(dt))[:, None] * L.weights.to(dt)
        gu = p * (g - (p * g).sum(1, keepdim=True)) / ctx.T
        out = gu.flatten().index_select(0, L.bucket_pos)
        return out.to(ctx.dtype), None, None, None


def channel_masks_eager(u, offsets, temperature: float = 1.0, divisors=None, hard_width: str = "threshold"):
    """Best eager channel_masks: ~12 vectorised ops forward, ~10 backward (closed form), no host sync."""
    return _MasksFn.apply(u, mask_layout(u, offsets, divisors), float(temperature), hard_width)


def channel_masks_autograd(u, offsets, temperature: float = 1.0, divisors=None, hard_width: str = "threshold"):
    """The same vectorised forward under plain autograd (what torch.compile differentiates best: a
    custom Function's backward is traced as written)."""
    w, E, keep, _ = _masks_forward(u, mask_layout(u, offsets, divisors), float(temperature), hard_width)
    return w.to(u.dtype), E.to(u.dtype), keep


def _masks_flat(u: torch.Tensor, L: MaskLayout, temperature: float, hard_width: str, TIE_RTOL: float = 1e-5,
                _p_out: list | None = None):
    """Segmented form on the packed buckets (no padding): segment max / sum by scatter_reduce and
    index_add, the reverse cumsum of the whole array in fp64 minus the suffix of the later groups."""
    dt = torch.promote_types(u.dtype, torch.float32)
    x = u.to(dt) / temperature
    m = x.new_full((L.G,), float("-inf")).scatter_reduce_(0, L.seg, x.detach(), "amax")
    e = (x - m.index_select(0, L.seg)).exp()
    # per-group sums in fp64: index_add sums sequentially (ATen's sum is pairwise); fp32 loses ~1e-6 here
    Z = torch.zeros(L.G, dtype=torch.float64, device=u.device).index_add(0, L.seg, e.double()).to(dt)
    p = e / Z.index_select(0, L.seg)
    if _p_out is not None:
        _p_out.append(p)
    R = p.double().flip(0).cumsum(0).flip(0)
    Rn = torch.cat([R, R.new_zeros(1)]).index_select(0, L.ends)
    w = (R - Rn.index_select(0, L.seg)).to(dt)
    s = torch.zeros(L.G, dtype=torch.float64, device=u.device).index_add(
        0, L.seg, (p * L.local1.to(dt)).double()).to(dt)                # sum_j w_j = sum_k p_k (k + 1)
    E = L.d.to(dt) * s
    with torch.no_grad():
        if hard_width == "threshold":
            t = (s / L.n.to(dt)) * (1 - TIE_RTOL)
            kb = torch.zeros(L.G, dtype=torch.int64, device=u.device).index_add_(
                0, L.seg, (w >= t.index_select(0, L.seg)).to(torch.int64))
        else:
            kb = torch.ceil(s - TIE_RTOL).nan_to_num(1.0).to(torch.int64)
        keep = torch.minimum(kb.clamp(min=1), L.n_int) * L.d_int
    if not L.unit:
        w = w.index_select(0, L.chan_bucket)
    return w.to(u.dtype), E.to(u.dtype), keep


def _segment_suffix(x: torch.Tensor, L: MaskLayout) -> torch.Tensor:
    """sum_{k >= j, same group} x_k for every bucket j (fp64 reverse cumsum minus the later groups)."""
    R = x.double().flip(0).cumsum(0).flip(0)
    Rn = torch.cat([R, R.new_zeros(1)]).index_select(0, L.ends)
    return (R - Rn.index_select(0, L.seg)).to(x.dtype)


class _MasksFlatFn(torch.autograd.Function):
    """The segmented forward with the closed-form backward: g_k = sum_{j<=k} gw_j (+ d (k+1) gE),
    gu = p (g - <p, g>_group) / T."""

    @staticmethod
    def forward(ctx, u, L, temperature, hard_width):
        keep_p = []
        with torch.no_grad():
            w, E, keep = _masks_flat(u, L, temperature, hard_width, _p_out=keep_p)
        ctx.save_for_backward(keep_p[0])
        ctx.L, ctx.T, ctx.dtype = L, temperature, u.dtype
        ctx.mark_non_differentiable(keep)
        return w, E, keep

    @staticmethod
    def backward(ctx, gw, gE, _gk):
        (p,) = ctx.saved_tensors
        L, dt = ctx.L, p.dtype
        if gw is None:
            g = p.new_zeros(L.N)
        else:
            gb = gw.to(dt) if L.unit else p.new_zeros(L.N).index_add_(0, L.chan_bucket, gw.to(dt))
            c = gb.double().cumsum(0)                         # prefix sums within groups
            starts = torch.cat([c.new_zeros(1), c]).index_select(0, L.ends - L.n_int)
            g = (c - starts.index_select(0, L.seg)).to(dt)
        if gE is not None:
            g = g + (L.d.to(dt) * gE.to(dt)).index_select(0, L.seg) * L.local1.to(dt)
        # <p, g> per group in fp64: index_add sums sequentially (ATen's sum is pairwise), and g ~ d (k+1) gE
        dot = torch.zeros(L.G, dtype=torch.float64, device=p.device).index_add_(0, L.seg, (p * g).double())
        gu = p * (g - dot.to(dt).index_select(0, L.seg)) / ctx.T
        return gu.to(ctx.dtype), None, None, None


def channel_masks_flat_cf(u, offsets, temperature: float = 1.0, divisors=None, hard_width: str = "threshold"):
    """Best eager, segmented form with the closed-form backward."""
    return _MasksFlatFn.apply(u, mask_layout(u, offsets, divisors), float(temperature), hard_width)


def channel_masks_flat(u, offsets, temperature: float = 1.0, divisors=None, hard_width: str = "threshold"):
    """Best eager, segmented (unpadded) form under autograd."""
    return _masks_flat(u, mask_layout(u, offsets, divisors), float(temperature), hard_width)


def channel_masks_for(offsets, divisors=None, temperature: float = 1.0, hard_width: str = "threshold",
                      device="cpu", closed_form: bool = False) -> Callable:
    """``u -> (w, E, keep)`` with the layout built now (the form to hand to torch.compile: the layout's
    index tensors are then constants of the graph, not traced)."""
    L = _layout(tuple(int(o) for o in offsets), None if divisors is None else tuple(int(d) for d in divisors),
                str(torch.device(device)))
    T = float(temperature)
    if closed_form == "flat":
        return lambda u: _masks_flat(u, L, T, hard_width)
    if closed_form:
        return lambda u: _MasksFn.apply(u, L, T, hard_width)

    def fn(u):
        w, E, keep, _ = _masks_forward(u, L, T, hard_width)
        return w.to(u.dtype), E.to(u.dtype), keep

    return fn


# ----------------------------------------------------------------------------------------------
# kl_gap_with_grads / kl_gap
# ----------------------------------------------------------------------------------------------


def kl_gap_with_grads_eager(s: torch.Tensor, h: torch.Tensor, temperature: float = 1.0, reduction: str = "batchmean"):
    """Loss and both gradients in closed form, softmaxes once, in-place where it saves memory:
    d = sum p (log p - log q), dd/dh = (q - p)/T, dd/ds = p (log p - log q - d)/T (per row).
    (B, C) logits, reduction batchmean or sum."""
    with torch.no_grad():
        B = s.shape[0]
        scale = (1.0 / B if reduction == "batchmean" else 1.0) / temperature
        ls = F.log_softmax(s if temperature == 1.0 else s / temperature, dim=-1)
        lh = F.log_softmax(h if temperature == 1.0 else h / temperature, dim=-1)
        p = ls.exp()
        diff = ls.sub_(lh)                                   # log p - log q (ls's storage)
        rows = (p * diff).sum(-1, keepdim=True)
        loss = rows.sum() * (1.0 / B if reduction == "batchmean" else 1.0)
        gh = lh.exp_().sub_(p).mul_(scale)                   # (q - p)/T (lh's storage)
        gs = diff.sub_(rows).mul_(p).mul_(scale)             # p (diff - d)/T
    return loss.to(s.dtype), gs, gh


class _KLGapFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, h, temperature, reduction):
        loss, gs, gh = kl_gap_with_grads_eager(s.detach(), h.detach(), temperature, reduction)
        ctx.save_for_backward(gs, gh)
        return loss

    @staticmethod
    def backward(ctx, g):
        gs, gh = ctx.saved_tensors
        return (g * gs if ctx.needs_input_grad[0] else None), (g * gh if ctx.needs_input_grad[1] else None), None, None


def kl_gap_eager(s, h, temperature: float = 1.0, reduction: str = "batchmean"):
    """Best eager kl_gap under autograd: the closed form above in a Function (gradients saved, scaled in
    backward; nothing recomputed)."""
    return _KLGapFn.apply(s, h, float(temperature), reduction)


def kl_gap_with_grads_autograd(s, h, temperature: float = 1.0, reduction: str = "batchmean"):
    """The plain-autograd form an expert would try under torch.compile: KL with log targets, one softmax
    each, both gradients by one autograd.grad (what inductor fuses into a few loops)."""
    s = s.detach().requires_grad_(True)
    h = h.detach().requires_grad_(True)
    with torch.enable_grad():
        ls = F.log_softmax(s / temperature, -1)
        lh = F.log_softmax(h / temperature, -1)
        loss = F.kl_div(lh, ls, reduction=reduction, log_target=True)
        gs, gh = torch.autograd.grad(loss, (s, h))
    return loss.detach(), gs, gh


# ----------------------------------------------------------------------------------------------
# ca_kld
# ----------------------------------------------------------------------------------------------


def _standardize(z: torch.Tensor, eps: float):
    n = z.shape[-1]
    c = z - z.mean(-1, keepdim=True)
    sigma = (c.square().sum(-1, keepdim=True) / max(n - 1, 1)).sqrt()
    return c, sigma, c / (sigma + eps)


class _CAKLDFn(torch.autograd.Function):
    """Closed form of CA-KLD's student gradient (teacher detached), saved in forward.

    With a = y_s / T (y the standardised logits), per row
    dL/da = gamma (p_s - p_t) + (1 - gamma) p_s (log p_s - log p_t - KL(p_s||p_t)), and through the
    standardisation y = c / (sigma + eps), c = z - mean(z), sigma = sqrt(sum c^2 / (n - 1)):
    dL/dz = (g - mean(g)) / (sigma + eps) - c <g, c> / ((sigma + eps)^2 (n - 1) sigma)."""

    @staticmethod
    def forward(ctx, zs, zt, temperature, gamma, standardize, reduction, eps):
        with torch.no_grad():
            B, C = zs.shape
            if gamma is None:  # mean top-1 probability of softmax(teacher) = exp(max - logsumexp)
                gamma = torch.exp(zt.amax(-1) - torch.logsumexp(zt, -1)).mean()
            else:
                gamma = torch.tensor(float(gamma), dtype=zs.dtype)
            if standardize:
                cs, sig_s, ys = _standardize(zs, eps)
                yt = _standardize(zt, eps)[2]
            else:
                ys, yt = zs, zt
            ls = F.log_softmax(ys / temperature, -1)
            lt = F.log_softmax(yt / temperature, -1)
            ps, pt = ls.exp(), lt.exp()
            diff = ls.sub_(lt)                                     # log p_s - log p_t
            kl_st = (ps * diff).sum(-1, keepdim=True)              # KL(p_s || p_t)
            kl_ts = -(pt * diff).sum(-1, keepdim=True)             # KL(p_t || p_s)
            rows = gamma * kl_ts + (1 - gamma) * kl_st
            scale = 1.0 / B if reduction == "batchmean" else 1.0
            loss = rows.sum() * scale
            g = diff.sub_(kl_st).mul_(ps).mul_(1 - gamma).add_(ps.sub_(pt).mul_(gamma))
            g.mul_(scale / temperature)
            if standardize:
                se = sig_s + eps
                dot = (g * cs).sum(-1, keepdim=True)
                k = dot / (se * se * max(C - 1, 1) * sig_s)
                g = (g - g.mean(-1, keepdim=True)).div_(se).sub_(cs.mul_(k))
        ctx.save_for_backward(g)
        return loss.to(zs.dtype)

    @staticmethod
    def backward(ctx, go):
        (g,) = ctx.saved_tensors
        return go * g, None, None, None, None, None, None


def ca_kld_eager(zs, zt, temperature: float = 4.0, gamma=None, standardize: bool = True,
                 reduction: str = "batchmean", eps: float = 1e-7):
    """Best eager CA-KLD (student gradient only; (B, C) logits; batchmean or sum)."""
    return _CAKLDFn.apply(zs, zt.detach(), float(temperature), gamma, standardize, reduction, eps)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

_COMPILE_SECONDS: dict[str, float] = {}


def compiled(name: str, fn: Callable, warm: Callable[[Callable], object], **kw) -> Callable:
    """``torch.compile(fn, **kw)`` (inductor), compiled now by calling ``warm(compiled_fn)`` twice; the
    seconds the first call took are kept under ``name`` (:func:`compile_seconds`)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    cf = torch.compile(fn, **kw)
    t0 = time.perf_counter()
    warm(cf)
    _COMPILE_SECONDS[name] = time.perf_counter() - t0
    warm(cf)
    return cf


def compile_seconds() -> dict[str, float]:
    return dict(_COMPILE_SECONDS)


# ----------------------------------------------------------------------------------------------
# Interleaved timing (one process, warm, same threads)
# ----------------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable], rounds: int = 15, target_s: float = 0.02) -> dict[str, list[float]]:
    """Per-call seconds of each variant, ``rounds`` rounds, the variants one after another within a round
    (so load from other processes hits all alike). Each round times ``reps`` calls, sized from a
    first call to ~target_s. Returns every round's per-call time."""
    reps = {}
    for k, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        dt = max(time.perf_counter() - t0, 1e-7)
        reps[k] = max(1, min(2000, int(target_s / dt)))
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            n = reps[k]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out[k].append((time.perf_counter() - t0) / n)
    return out


# ----------------------------------------------------------------------------------------------
# The measurement: every op, fused against every baseline, one process, interleaved
# ----------------------------------------------------------------------------------------------

KL_SHAPES = [(64, 10), (512, 100), (512, 1000), (4096, 1000), (512, 32000)]
KL_AUTOGRAD_SHAPES = [(64, 10), (512, 1000)]
CA_SHAPES = [(512, 100), (512, 1000), (512, 32000)]
BASELINES = ("reference", "best_eager", "compiled_reference", "compiled_best_eager")


def _no_compile_cache() -> None:
    """Compile times are of a cold compile: inductor's on-disk caches off for this process."""
    import torch._functorch.config as fc
    import torch._inductor.config as ic

    ic.fx_graph_cache = False
    if hasattr(fc, "enable_autograd_cache"):
        fc.enable_autograd_cache = False


def masks_cases():
    """{name: (fused, {baseline: fn}, extra eager variants)} for channel_masks fwd+bwd on ResNet-50's groups."""
    import s2h_kernels
    from s2h_kernels import reference
    from test_bench_channel_masks import packed_inputs, step

    u, offsets, grads = packed_inputs("cpu")
    offs = offsets.tolist()
    run = lambda f: step(lambda u_, o: f(u_), u, offsets, grads)  # noqa: E731
    ref = lambda u_: reference.channel_masks(u_, offs)  # noqa: E731
    eager = channel_masks_for(offs, closed_form="flat")
    cref = compiled("channel_masks reference", ref, run)
    ceager = compiled("channel_masks eager segmented, autograd", eager, run)
    cpad = compiled("channel_masks eager padded, closed form", channel_masks_for(offs, closed_form=True), run)
    name = f"channel_masks fwd+bwd, ResNet-50 ({len(offs) - 1} groups, {offs[-1]} channels)"
    fns = {
        "fused": lambda: step(s2h_kernels.channel_masks, u, offsets, grads),
        "reference": lambda: run(ref),
        "eager: segmented, closed form": lambda: step(channel_masks_flat_cf, u, offsets, grads),
        "eager: padded, closed form": lambda: step(channel_masks_eager, u, offsets, grads),
        "eager: segmented, autograd": lambda: run(eager),
        "compiled_reference": lambda: run(cref),
        "compiled: segmented, autograd": lambda: run(ceager),
        "compiled: padded, closed form": lambda: run(cpad),
    }
    return {name: fns}


def _kl_inputs(B, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(B, C, generator=g), 2.0 * torch.randn(B, C, generator=g)


def kl_cases():
    import s2h_kernels
    from s2h_kernels import reference

    out = {}
    for B, C in KL_SHAPES:
        s, h = _kl_inputs(B, C)
        cref = compiled(f"kl_gap_with_grads reference B={B} C={C}", reference.kl_gap_with_grads, lambda f: f(s, h))
        ceager = compiled(f"kl_gap_with_grads best eager B={B} C={C}", kl_gap_with_grads_eager, lambda f: f(s, h))
        cauto = compiled(f"kl_gap_with_grads autograd form B={B} C={C}", kl_gap_with_grads_autograd,
                         lambda f: f(s, h))
        out[f"kl_gap_with_grads B={B} C={C}"] = {
            "fused": lambda s=s, h=h: s2h_kernels.kl_gap_with_grads(s, h),
            "reference": lambda s=s, h=h: reference.kl_gap_with_grads(s, h),
            "eager: closed form": lambda s=s, h=h: kl_gap_with_grads_eager(s, h),
            "eager: log-target kl_div, one autograd.grad": lambda s=s, h=h: kl_gap_with_grads_autograd(s, h),
            "paper d1 + d2 (not a baseline: recomputes)": lambda s=s, h=h: _paper_d1_d2(s, h),
            "compiled_reference": lambda s=s, h=h, f=cref: f(s, h),
            "compiled: closed form": lambda s=s, h=h, f=ceager: f(s, h),
            "compiled: autograd form": lambda s=s, h=h, f=cauto: f(s, h),
        }
    for B, C in KL_AUTOGRAD_SHAPES:
        s0, h0 = _kl_inputs(B, C)
        s, h = s0.clone().requires_grad_(True), h0.clone().requires_grad_(True)

        def with_grad(fn, s=s, h=h):
            loss = fn(s, h)
            return torch.autograd.grad(loss, (s, h))

        cref = compiled(f"kl_gap reference B={B} C={C}", lambda a, b: with_grad(reference.kl_gap, a, b),
                        lambda f: f(s, h))
        ceager = compiled(f"kl_gap best eager B={B} C={C}", lambda a, b: with_grad(kl_gap_eager, a, b),
                          lambda f: f(s, h))
        out[f"kl_gap + autograd.grad B={B} C={C}"] = {
            "fused": lambda wg=with_grad: wg(s2h_kernels.kl_gap),
            "reference": lambda wg=with_grad: wg(reference.kl_gap),
            "eager: closed form in a Function": lambda wg=with_grad: wg(kl_gap_eager),
            "compiled_reference": lambda f=cref, s=s, h=h: f(s, h),
            "compiled: closed form in a Function": lambda f=ceager, s=s, h=h: f(s, h),
        }
    for B, C in CA_SHAPES:
        zs0, zt = _kl_inputs(B, C, seed=1)
        zs = zs0.clone().requires_grad_(True)

        def ca(fn, zs=zs, zt=zt):
            loss = fn(zs, zt, 4.0)
            return torch.autograd.grad(loss, zs)

        cref = compiled(f"ca_kld reference B={B} C={C}", lambda a, b: torch.autograd.grad(reference.ca_kld(a, b, 4.0), a),
                        lambda f: f(zs, zt))
        ceager = compiled(f"ca_kld best eager B={B} C={C}", lambda a, b: torch.autograd.grad(ca_kld_eager(a, b, 4.0), a),
                          lambda f: f(zs, zt))
        out[f"ca_kld + student grad B={B} C={C}"] = {
            "fused": lambda ca=ca: ca(s2h_kernels.ca_kld),
            "reference": lambda ca=ca: ca(reference.ca_kld),
            "eager: closed form in a Function": lambda ca=ca: ca(ca_kld_eager),
            "compiled_reference": lambda f=cref, zs=zs, zt=zt: f(zs, zt),
            "compiled: closed form in a Function": lambda f=ceager, zs=zs, zt=zt: f(zs, zt),
        }
    return out


def _paper_d1_d2(s, h):
    s = s.detach().requires_grad_(True)
    h = h.detach().requires_grad_(True)
    with torch.enable_grad():
        d1 = F.kl_div(F.log_softmax(h, -1), F.softmax(s.detach(), -1), reduction="batchmean")
        d2 = F.kl_div(F.log_softmax(h.detach(), -1), F.softmax(s, -1), reduction="batchmean")
        (gh,) = torch.autograd.grad(d1, h)
        (gs,) = torch.autograd.grad(d2, s)
    return d1.detach(), gs, gh


def summarize(times: dict[str, list[float]]) -> dict[str, float]:
    """Per-call minimum of each variant; ``best_eager`` / ``compiled_best_eager`` are the fastest of the
    expert variants (keys ``"eager: ..."`` / ``"compiled: ..."``) in this run."""
    mins = {k: min(v) for k, v in times.items()}
    for kind, prefix in (("best_eager", "eager: "), ("compiled_best_eager", "compiled: ")):
        ks = [k for k in times if k.startswith(prefix)]
        if ks:
            mins[kind] = min(mins[k] for k in ks)
    return mins


def ratio_rows(name: str, threads: int, times: dict[str, list[float]]) -> list[str]:
    """One markdown row: per-call minimum of each variant, baseline / fused ratios of the minima; a second
    row lists every variant (which expert variant was the best)."""
    import statistics

    mins = summarize(times)
    f = mins["fused"]
    fastest = min((k for k in BASELINES if k in mins), key=mins.get)
    noise = statistics.median(times["fused"]) / f
    cells = [name, str(threads), f"{f * 1e6:.1f}"]
    cells += [f"{mins[k] * 1e6:.1f} ({mins[k] / f:.2f}x)" if k in mins else "" for k in BASELINES]
    cells += [f"{mins[fastest] / f:.2f}x ({fastest.replace('_', ' ')})", f"{noise:.2f}"]
    extra = [f"{k}: {mins[k] / f:.2f}x" for k in times if k not in ("fused", "reference", "compiled_reference")]
    return ["| " + " | ".join(cells) + " |"] + ([f"|  | variants: {'; '.join(extra)} | | | | | | | |"] if extra else [])


def main() -> None:
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--only", choices=("masks", "kl"), default=None)
    args = ap.parse_args()
    _no_compile_cache()
    cases = {}
    torch.set_num_threads(max(args.threads))
    if args.only in (None, "masks"):
        cases.update(masks_cases())
    if args.only in (None, "kl"):
        cases.update(kl_cases())
    head = ("| case | threads | fused us | reference | best eager | compiled reference | compiled best eager | "
            "vs fastest baseline | fused median/min |")
    lines = [f"torch {torch.__version__}; load average at start {os.getloadavg()[0]:.1f}; {args.rounds} rounds, "
             "interleaved; times: minimum over rounds of the per-call mean (us), ratio = baseline / fused", "",
             head, "|" + "---|" * 9]
    print("\n".join(lines), flush=True)
    for t in args.threads:
        torch.set_num_threads(t)
        for name, fns in cases.items():
            rows = ratio_rows(name, t, interleaved(fns, rounds=args.rounds))
            print("\n".join(rows), flush=True)
            lines += rows
    lines += ["", "Compile seconds (first call, inductor, cold caches; excluded from the times above):", ""]
    lines += [f"- {k}: {v:.1f} s" for k, v in compile_seconds().items()]
    print("\n".join(lines[-len(compile_seconds()) - 3:]))


if __name__ == "__main__":
    main()
