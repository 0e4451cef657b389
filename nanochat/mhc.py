"""Dynamic Manifold-Constrained Hyper-Connections (mHC, arXiv 2512.24880, Eq. 7-9).

The residual stream is widened to n streams, x: [B, T, n, C] (kept flattened as [B, T, n*C] between blocks).
Around each sub-layer (attention and MLP each count as one):

    v      = RMSNorm(flatten(x))                                   one parameter-free norm over n*C
    logits = v @ phi                                               one fused projection [n*C, n*n + 2n]
    H_pre  = sigmoid(alpha_pre  * logits_pre  + b_pre)             [B, T, n]     read-out of the streams
    H_post = 2 * sigmoid(alpha_post * logits_post + b_post)        [B, T, n]     write-back to the streams
    H_res  = SinkhornKnopp(alpha_res * logits_res + b_res)         [B, T, n, n]  doubly stochastic mixing
    H_res  = (1 - g) * I + g * H_res                               gate g in [0, 1] (still doubly stochastic)
    y      = branch(sum_i H_pre[i] * x[i])                         the branch keeps its own pre-norm
    x_next = H_res @ x + H_post[j] * y                             per stream j

Design decisions (the paper leaves them open; docs/design.md, section 4):
- Near-identity start through the gate, not through a saturated Sinkhorn. The learned matrix Sinkhorn(b_res)
  starts at diagonal `res_init_diag` (0.6; uniform mixing would be 1/n) and the gate at `gate_init` (0.2), so the
  effective H_res = (1 - g) I + g Sinkhorn(b_res) has diagonal 1 - g (1 - d) = 0.92 at step 0. Why not put the
  near-identity into b_res (diagonal 0.95, gate ~1)? Sinkhorn converges at rate ~lambda_2^2 per iteration, with
  lambda_2 = (n d - 1) / (n - 1) the second eigenvalue of the matrix it converges to: 0.47 at d = 0.6 (20 iterations
  leave ~1e-13) but 0.93 at d = 0.95 (20 iterations leave ~6%, in the column sums of every perturbed matrix and in
  the unrolled gradient). And the gate's gradient is proportional to H_res - I, so a gate in front of a 5% departure
  from I barely learns. The public repos go further (tau = 0.05, -8 logits: exp(-160) = 0, exactly I, exactly zero
  gradient); here every parameter has a first-order gradient at step 0 (tests/test_mhc.py).
- H_pre of sub-layer k starts at sigmoid(1) = 0.73 on stream k mod n and 0.5 on the others (HC's A_m = e_(k mod n),
  softened so that sigmoid is far from saturation): every branch reads all streams, sub-layers read them
  differently, and stream differences reach the loss at first order. H_post starts at 2 sigmoid(0) = 1 (every
  stream receives the branch output, as a plain residual). phi ~ N(0, 1/(nC)) and alpha = 0.01 (the paper's): the
  dynamic part starts as a ~1% perturbation with a non-zero gradient for phi and alpha.
- Gate. g = sigmoid(gate_logit), learned by default (`gate_learnable=False` fixes g = gate_init). The RL controller
  overrides it with set_gate(v), v in [0, 1] (v = 1: full learned mixing, v = 0: identity, H_res = I exactly), one
  value or one per example ([B]: a batch of rollouts with different actions in one forward); clear_gate() returns to
  the learned value. An override is run state: a plain attribute, never in the state dict or a checkpoint.
- Gate-range training (so the controller's range is not out of distribution): `gate_noise` a multiplies g by
  U[1 - a, 1 + a] (the plan's a = 0.2) and clamps to [0, 1]; `gate_sample_frac` f replaces g, for a fraction f of
  the sequences, by an independent draw from U[0, 1] per sub-layer and sequence. Either way g stays in [0, 1], so
  H_res stays doubly stochastic and non-negative; the learned gate keeps its gradient from the other sequences.
- Inference-time Sinkhorn (run state, never saved): GPT.set_inference_sinkhorn_iters(k) runs k < sinkhorn_iters
  iterations, but only in eval mode with grad disabled; training, and anything that backpropagates, keep the
  config's count (the model was trained through exactly those unrolled steps). A fixed count, no early exit on
  convergence: a data-dependent loop would break compiled graphs. What fewer iterations cost in accuracy and
  save in time: benchmarks/sinkhorn_inference.py, docs/performance.md.
- Orthostochastic alternative: H_res = NS(logits) ** 2 elementwise (rows/columns sum to 1 when NS has converged,
  hence the 8-step schedule by default). Its b_res starts at I + delta * S (S skew-symmetric), whose polar factor is
  a rotation with (O*O) diagonal `res_init_diag` (not the public repo's 0/-8 init, whose squared polar factor is the
  uniform 1/4 mixing).
- Stream ends (nanochat/gpt.py): replicated at the input plus a zero-mean learnable stream embedding; collapsed at
  the output by StreamReadout, a learned sigmoid-weighted sum (HC's plain sum would make the last sub-layer's H_res
  and gate cancel exactly; see StreamReadout).
- Precision (docs/performance.md). The coefficient math (norm, projection, Sinkhorn, NS), the read-out and the
  mixing run in fp32 whatever the autocast dtype; only the branch runs under autocast. The streams are fp32 by
  default (as the baseline's residual); GPTConfig.mhc_bf16_streams stores them in bf16 under autocast, and the
  Functions below still accumulate in fp32. What is saved for backward stays in its own dtype: the branch input
  is handed over in the autocast dtype and the branch output y is saved as it comes (bf16), never as fp32 copies.

Speed and memory (benchmarks/mhc_overhead.py, benchmarks/mhc_traffic.py): RMSNorm(x) @ phi is computed as
(x @ phi) / rms(x) -- the norm is one scalar per token -- so the normalised [N, nC] copy is never made (the paper's
kernel does the same, Eq. 10-19); Sinkhorn runs in its scaling form with a hand-written unrolled backward
(`sinkhorn`, below) instead of 40 autograd-recorded log-sum-exps per sub-layer; the read-out and the mixing are one
batched matmul over the streams ([H_pre; H_res] @ x), with the branch's pre-norm folded in (the un-normalised
read-out is never stored), and the write-back is its own small Function (no [B,T,n,n,C] temporaries, no Python
branching on values in forward).

Compile: the floats a custom autograd Function uses are literals in its own code. Under torch.compile(dynamic=True),
Dynamo lifts a module-level float read inside Function.forward (or a float passed to apply) to a symbolic input and
then fails on the second call in a graph; a float class attribute breaks the graph instead (torch 2.13).
tests/test_compile.py scans every Function for both.
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import einops
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.common import UserError
from nanochat.newton_schulz import resolve_ns_coeffs, zeropower_via_newtonschulz

READOUTS = ("learned", "sum")
# H_pre of sub-layer k (and the learned read-out) starts at sigmoid(1) = 0.73 on stream k mod n and 0.5 elsewhere
PRE_PREFERENCE_LOGIT = 1.0


def _opt(default, help: str):
    return field(default=default, metadata=dict(help=help))


@dataclass
class MHCConfig:
    """Every Dynamic mHC setting, declared once. GPTConfig and TrainConfig each hold one (their `mhc` field); the
    flags (--mhc-<setting>), TOML keys and the flat names in checkpoints and config.json (mhc_<setting>) are
    generated from these fields (nanochat/common.py, flat_fields). validate() is the one check of their values."""
    enabled: bool = _opt(False, "wrap attention and MLP in Dynamic mHC connections (off: the plain residual)")
    num_streams: int = _opt(4, "residual streams n (expansion rate; the paper's 4)")
    sinkhorn_iters: int = _opt(20, "Sinkhorn-Knopp iterations for H_res (the paper's t_max = 20)")
    sinkhorn_tau: float = _opt(1.0, "Sinkhorn temperature (the paper uses none, i.e. 1)")
    constraint: str = _opt("sinkhorn", "H_res manifold: sinkhorn | orthostochastic | a name given to "
                           "nanochat.mhc.register_constraint")
    ns_coeffs: str = _opt("handover8", "Newton-Schulz preset or literal of the orthostochastic projection")
    dynamic: bool = _opt(True, "per-token (dynamic) matrices; --no-mhc-dynamic = static (biases only)")
    alpha_init: float = _opt(0.01, "initial alpha_pre/post/res, the dynamic part's gains (the paper's 0.01)")
    res_init_diag: float = _opt(0.6, "diagonal d of the learned H_res(b_res) at init, in (1/n, 1); the effective "
                                "H_res starts at diagonal 1 - g(1 - d)")
    gate_init: float = _opt(0.2, "initial gate g in H_res := (1-g) I + g H_res")
    gate_learnable: bool = _opt(True, "learn the gate, g = sigmoid(theta) (else fixed at --mhc-gate-init)")
    gate_noise: float = _opt(0.0, "training-time gate noise a, g *= U[1-a, 1+a] clamped to [0, 1] (the original "
                             "plan used 0.2)")
    gate_sample_frac: float = _opt(0.0, "gate-range training: the fraction of sequences whose gates are drawn from "
                                   "U[0, 1] (per sub-layer) instead of the learned value, so an RL controller's "
                                   "range is in distribution")
    stream_embed_std: float = _opt(1.0, "init std of the stream embedding that breaks the replicated streams' "
                                   "symmetry (x has unit RMS too)")
    readout: str = _opt("learned", "streams -> head: learned (sigmoid-weighted, as DeepSeek-V4's hc_head) | sum "
                        "(HC; the last sub-layer's H_res then cancels)")
    bf16_streams: bool = _opt(False, "under bf16 autocast, keep the n residual streams in bf16 (half their memory; "
                              "the coefficient math and the mixing still accumulate in fp32); no effect in fp32")

    def validate(self):
        """The one check of these values; errors name the flat setting (mhc_<name>)."""
        def bad(name: str, rule: str, value):
            raise UserError(f"mhc_{name} must be {rule} (got {value!r})")
        for name in ("num_streams", "sinkhorn_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, "an integer >= 1", value)
        if not self.sinkhorn_tau > 0 or not math.isfinite(self.sinkhorn_tau):
            bad("sinkhorn_tau", "a finite number > 0", self.sinkhorn_tau)
        if self.constraint not in CONSTRAINTS:
            bad("constraint", "one of " + ", ".join(CONSTRAINTS), self.constraint)
        n = self.num_streams
        if n > 1 and not 1 / n < self.res_init_diag < 1:
            bad("res_init_diag", f"in (1/n, 1) = ({1 / n:.3f}, 1)", self.res_init_diag)
        if self.gate_learnable and not 0 < self.gate_init < 1:
            raise UserError(f"mhc_gate_init must be in (0, 1) for a learned gate (sigmoid never reaches 0 or 1); got "
                            f"{self.gate_init!r} (use mhc_gate_learnable=false to fix the gate at 0 or 1)")
        if not self.gate_learnable and not 0 <= self.gate_init <= 1:
            bad("gate_init", "in [0, 1]", self.gate_init)
        for name in ("gate_noise", "gate_sample_frac"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, "in [0, 1]", getattr(self, name))
        if self.stream_embed_std < 0:
            bad("stream_embed_std", ">= 0", self.stream_embed_std)
        if self.readout not in READOUTS:
            bad("readout", "one of " + ", ".join(READOUTS), self.readout)
        if self.constraint == "orthostochastic":
            resolve_ns_coeffs(self.ns_coeffs)
        return self

    def gate_range_trained(self) -> bool:
        """Whether training drew gates over [0, 1] (so an RL controller acts where the model was trained)."""
        return self.enabled and self.gate_sample_frac > 0


def _fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """Coefficient math runs in fp32 (bf16/fp16 are too coarse for Sinkhorn/NS); float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


# -- the manifold projections ---------------------------------------------------------------------------------------

def sinkhorn_log(logits: torch.Tensor, num_iters: int = 20, tau: float = 1.0) -> torch.Tensor:
    """Sinkhorn-Knopp in log space: [..., n, n] logits -> doubly stochastic matrices (fp32 whatever the input).

    Starts from exp(logits / tau) and alternates column and row normalisation (T_r(T_c(M)), as the paper); after
    the final row step rows sum to 1 exactly and columns within the Sinkhorn tolerance. Log space keeps any logits
    (+-1e4) finite. The reference implementation (plain autograd); DynamicMHC uses the faster `sinkhorn`.
    """
    log_m = _fp32_or_wider(logits) / tau
    for _ in range(num_iters):
        log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)  # columns
        log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)  # rows
    return log_m.exp()


class _SinkhornScaling(torch.autograd.Function):
    """The iteration of sinkhorn_log in its scaling form, P = diag(r) K diag(c) with K = exp(logits), which only
    updates two [n] vectors per step: c = 1 / (K^T r) (columns), r = 1 / (K c) (rows). Works with tokens innermost
    ([n, n, N]) so every op is a contiguous elementwise op or a reduction over a leading dim (batched 4x4 matmuls are
    slow on the CPU). The backward is the exact derivative of the T unrolled steps, written out from the saved
    scalings r_0..r_T, c_1..c_T ([n, N] each), instead of autograd's record of every intermediate [N, n, n]."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, num_iters: int) -> torch.Tensor:
        # The scaling form works on exp(logits - column max); fp32 exp() underflows below about -87, so log-ratios
        # are floored at -80 nats. Any matrix whose entries lie within 80 nats of their column's maximum is computed
        # exactly (the same numbers as sinkhorn_log); beyond, the floored entries weigh e^-80 ~ 2e-35 and everything
        # stays finite. A literal, as every float a custom Function uses (module docstring, "Compile").
        min_log_ratio = -80.0
        shape, n = logits.shape, logits.shape[-1]
        L = logits.reshape(-1, n, n).permute(1, 2, 0)                  # [n, n, N]
        # a constant per column is absorbed exactly by the first column step, so shifting by the column max changes
        # nothing and puts every entry of K in (0, 1] with a 1 in every column
        L = L - L.amax(dim=0, keepdim=True)
        live = L > min_log_ratio                                        # where the floor did not bite
        K = L.clamp_min(min_log_ratio).exp_().contiguous()
        r = torch.ones_like(K[0])                                       # [n, N]
        rs, cs = [r], []
        for _ in range(num_iters):
            c = (K * r[:, None]).sum(0).reciprocal_()                   # 1 / column sums of diag(r) K
            r = (K * c[None]).sum(1).reciprocal_()                      # 1 / row sums of K diag(c)
            rs.append(r)
            cs.append(c)
        ctx.save_for_backward(K, live, *rs, *cs)
        ctx.shape, ctx.num_iters = shape, num_iters
        return (K * r[:, None] * c[None]).permute(2, 0, 1).contiguous().view(shape)  # tokens first again

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        K, live, *scalings = ctx.saved_tensors
        T, n = ctx.num_iters, K.shape[0]
        R, C = scalings[:T + 1], scalings[T + 1:]                       # r_0 .. r_T, c_1 .. c_T (C[t - 1] = c_t)
        G = grad.reshape(-1, n, n).permute(1, 2, 0).contiguous()        # dL/dP, [n, n, N]
        GK = G * K
        K_bar = G * R[T][:, None] * C[T - 1][None]                      # P = r_T K c_T, through K directly
        r_bar = (GK * C[T - 1][None]).sum(1)
        c_bar_out = (GK * R[T][:, None]).sum(0)
        for t in range(T, 0, -1):
            r_t, c_t = R[t], C[t - 1]
            s = -(r_t * r_t) * r_bar                                    # row step r_t = 1 / (K c_t): d/d(K c_t)
            K_bar.addcmul_(s[:, None], c_t[None])
            c_bar = (K * s[:, None]).sum(0)                             # c_t feeds row step t (and P if t = T)
            if t == T:
                c_bar = c_bar + c_bar_out
            s = -(c_t * c_t) * c_bar                                    # column step c_t = 1 / (K^T r_(t-1))
            K_bar.addcmul_(R[t - 1][:, None], s[None])
            r_bar = (K * s[None]).sum(1)                                # r_0 = 1 is a constant: its grad is dropped
        grad_logits = (K_bar * K * live).permute(2, 0, 1).contiguous().view(ctx.shape)
        return grad_logits, None


def sinkhorn(logits: torch.Tensor, num_iters: int = 20, tau: float = 1.0) -> torch.Tensor:
    """Sinkhorn-Knopp as sinkhorn_log ([..., n, n] logits -> doubly stochastic, fp32 or float64), computed in the
    scaling form with a hand-written backward: the same numbers (tested to fp32 rounding, and gradcheck'ed in
    float64) with ~10x fewer kernels and only [n, N] vectors saved for backward. Log-ratios below -80 nats within a
    column are floored (see _SinkhornScaling.forward), so extreme logits (+-1e4) stay finite."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _SinkhornScaling.apply(_fp32_or_wider(logits) / tau, num_iters)


def _rms_eps(t: torch.Tensor) -> float:
    """F.rms_norm's default epsilon for a tensor of this dtype."""
    return torch.finfo(t.dtype).eps


def _read_coefficients(H_pre: torch.Tensor, H_res: torch.Tensor | None) -> torch.Tensor:
    """[N, n] (and [N, n, n]) -> the rows one batched matmul applies to the streams: [N, 1 (+ n), n]."""
    rows = H_pre.unsqueeze(1)
    return rows if H_res is None else torch.cat([rows, H_res], dim=1)


def _read_forward(ctx, H_pre, H_res, xs, normalize: bool, out_dtype):
    """The read-out r = sum_i H_pre[i] x[i] (RMS-normalised when `normalize`) and, with H_res, the mixing H_res x,
    from one pass over the streams; everything in fp32 (or float64) whatever the streams' dtype."""
    xf = _fp32_or_wider(xs)                                                 # a transient copy for bf16 streams
    prod = torch.bmm(_read_coefficients(H_pre, H_res).to(xf.dtype), xf)    # [N, 1 + n, C]
    r = prod[:, 0]
    inv = torch.rsqrt(r.square().mean(-1, keepdim=True) + _rms_eps(r)) if normalize else r.new_empty(0)
    branch_in = (r * inv if normalize else r).to(out_dtype).contiguous()
    ctx.save_for_backward(H_pre, H_res if H_res is not None else H_pre.new_empty(0), xs, inv)
    ctx.normalize = normalize
    return branch_in, (prod[:, 1:] if H_res is not None else None)


def _read_backward(ctx, g_branch, g_mixed):
    H_pre, H_res, xs, inv = ctx.saved_tensors
    xf = _fp32_or_wider(xs)
    g_r = g_branch.to(xf.dtype)                                              # [N, C]
    if ctx.normalize:  # RMSNorm's backward, with the read-out recomputed (it is never stored)
        n_hat = torch.bmm(H_pre.unsqueeze(1).to(xf.dtype), xf).squeeze(1) * inv
        g_r = inv * (g_r - n_hat * (g_r * n_hat).mean(-1, keepdim=True))
    grad_H_pre = torch.bmm(xf, g_r.unsqueeze(2)).squeeze(2).to(H_pre.dtype)  # [N, n]
    grad_xs = H_pre.unsqueeze(2).to(xf.dtype) * g_r.unsqueeze(1)             # [N, n, C]
    grad_H_res = None
    if g_mixed is not None and H_res.numel():
        g_mixed = g_mixed.to(xf.dtype)
        grad_H_res = torch.bmm(g_mixed, xf.mT).to(H_res.dtype)                # [N, n, n]
        grad_xs = torch.baddbmm(grad_xs, H_res.mT.to(xf.dtype), g_mixed)
    return grad_H_pre, grad_H_res, grad_xs.to(xs.dtype)


class _ReadStreams(torch.autograd.Function):
    """The streams' read-out: H_pre [N, n], xs [N, n, C] -> sum_i H_pre[i] x[i], [N, C] in out_dtype, RMS-normalised
    when `normalize` (the branch's parameter-free pre-norm, folded in so the un-normalised read-out is never
    stored: its backward recomputes it from the streams, which are saved anyway). Computed in fp32 whatever the
    streams' dtype; saves only H_pre, the streams and one inverse RMS per token."""

    @staticmethod
    def forward(ctx, H_pre, xs, normalize: bool, out_dtype):
        return _read_forward(ctx, H_pre, None, xs, normalize, out_dtype)[0]

    @staticmethod
    def backward(ctx, grad):
        grad_H_pre, _, grad_xs = _read_backward(ctx, grad, None)
        return grad_H_pre, grad_xs, None, None


class _ReadMixStreams(torch.autograd.Function):
    """The read-out and the mixing from one pass over the streams: H_pre [N, n], H_res [N, n, n], xs [N, n, C] ->
    (branch input [N, C] as _ReadStreams, H_res x [N, n, C] in fp32). One batched matmul with the rows
    [H_pre; H_res] reads the streams once (two reads before); the backward returns one gradient for the streams
    (two for autograd to add before). The write-back of the branch output is _WriteBack."""

    @staticmethod
    def forward(ctx, H_pre, H_res, xs, normalize: bool, out_dtype):
        return _read_forward(ctx, H_pre, H_res, xs, normalize, out_dtype)

    @staticmethod
    def backward(ctx, g_branch, g_mixed):
        grad_H_pre, grad_H_res, grad_xs = _read_backward(ctx, g_branch, g_mixed)
        return grad_H_pre, grad_H_res, grad_xs, None, None


class _WriteBack(torch.autograd.Function):
    """out[t, j] = mixed[t, j] + H_post[t, j] y[t]: mixed [N, n, C] (fp32), H_post [N, n] (fp32), y [N, C] (the
    branch output, bf16 under autocast) -> [N, n, C] in out_dtype (the streams' dtype). Accumulates in fp32 and
    saves y in its own dtype (autograd would save the fp32 copy that the addition makes)."""

    @staticmethod
    def forward(ctx, mixed, H_post, y, out_dtype):
        ctx.save_for_backward(H_post, y)
        out = torch.addcmul(mixed, H_post.unsqueeze(2), y.unsqueeze(1).to(mixed.dtype))
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        H_post, y = ctx.saved_tensors
        g = grad.to(H_post.dtype)
        grad_H_post = torch.bmm(g, y.to(g.dtype).unsqueeze(2)).squeeze(2) if ctx.needs_input_grad[1] else None
        grad_y = torch.bmm(H_post.unsqueeze(1), g).squeeze(1).to(y.dtype) if ctx.needs_input_grad[2] else None
        return g, grad_H_post, grad_y, None


def orthostochastic_project(logits: torch.Tensor, ns_coeffs="handover8", ns_steps: int | None = None) -> torch.Tensor:
    """[..., n, n] logits -> (NS-orthogonalised logits) ** 2, computed in fp32.

    Each row and column of an orthogonal matrix is a unit vector, so its elementwise square is doubly stochastic;
    NS only approximates orthogonality, so the sums are as good as the NS schedule (see newton_schulz.py).
    """
    logits = _fp32_or_wider(logits)
    ortho = zeropower_via_newtonschulz(logits, resolve_ns_coeffs(ns_coeffs), ns_steps, dtype=logits.dtype)
    return ortho.square()


def _sinkhorn_diag_logit(n: int, diag: float) -> float:
    """Logit D with Sinkhorn([[D on the diagonal, 0 off it]]) having `diag` on its diagonal: for this symmetric
    start the normalisation is exact, diag = e^D / (e^D + n - 1). With one stream H_res = [[1]] whatever D."""
    if n == 1:
        return 0.0
    return math.log(diag * (n - 1) / (1 - diag))


@functools.lru_cache(maxsize=None)
def _ortho_init_logits(n: int, diag: float) -> torch.Tensor:
    """I + delta * S, S_ij = sign(j - i): its polar factor is a rotation, so (O*O) has diagonal ~ `diag`."""
    S = torch.ones(n, n, device="cpu").triu(1) - torch.ones(n, n, device="cpu").tril(-1)  # cpu: also under meta
    # bisection on delta: the diagonal of (polar(I + delta S))^2 falls monotonically from 1 (delta = 0) towards 0
    lo, hi = 0.0, 10.0
    for _ in range(50):
        mid = (lo + hi) / 2
        U, _, Vh = torch.linalg.svd(torch.eye(n, dtype=torch.float64, device="cpu") + mid * S.double())
        mean_diag = (U @ Vh).diagonal().square().mean().item()
        lo, hi = (mid, hi) if mean_diag > diag else (lo, mid)
    return torch.eye(n, device="cpu") + lo * S


def _preference_bias(n: int, index: int) -> torch.Tensor:
    """PRE_PREFERENCE_LOGIT on stream index mod n, 0 elsewhere (HC's one-hot A_m, softened)."""
    b = torch.zeros(n, device="cpu")
    b[index % n] = PRE_PREFERENCE_LOGIT
    return b


# -- H_res constraints: pluggable --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Constraint:
    """A manifold for H_res. project(logits [..., n, n], connection) -> [..., n, n] doubly stochastic matrices in fp32
    (the connection gives its settings: sinkhorn_iters, sinkhorn_tau, ns_coeffs); init_logits(n, diag, connection)
    -> the [n, n] b_res at init (a CPU tensor) whose projection has `diag` on its diagonal."""
    project: Callable
    init_logits: Callable


CONSTRAINTS: dict[str, Constraint] = {}


def register_constraint(name: str, project: Callable, init_logits: Callable | None = None):
    """Make `name` a value of MHCConfig.constraint (and of --mhc-constraint). init_logits defaults to Sinkhorn's
    symmetric start (diagonal logit D, 0 off it), right for any projection that normalises exp(logits)."""
    CONSTRAINTS[name] = Constraint(project, init_logits or _sinkhorn_init_logits)


def _sinkhorn_init_logits(n: int, diag: float, connection) -> torch.Tensor:
    # symmetric start: Sinkhorn is exact on it
    return torch.eye(n, device="cpu") * _sinkhorn_diag_logit(n, diag) * getattr(connection, "sinkhorn_tau", 1.0)


# the one constraint that honours DynamicMHC.set_inference_sinkhorn_iters: it reads its iteration count through
# the connection's _sinkhorn_iters_now()
INFERENCE_ITERS_CONSTRAINT = "sinkhorn"
register_constraint(INFERENCE_ITERS_CONSTRAINT,
                    lambda logits, c: sinkhorn(logits, c._sinkhorn_iters_now(), c.sinkhorn_tau),
                    _sinkhorn_init_logits)
register_constraint("orthostochastic", lambda logits, c: orthostochastic_project(logits, c.ns_coeffs),
                    lambda n, diag, c: _ortho_init_logits(n, diag).clone())  # clone: the cached tensor stays intact


class _NormedProjection(torch.autograd.Function):
    """RMSNorm(x) @ phi as (x @ phi, 1 / RMS(x)): x [N, D] (the streams, fp32 or bf16), phi [D, m] -> proj [N, m] and
    inv [N, 1], both fp32 (float64 for float64 input); RMSNorm(x) @ phi = proj * inv. The norm is one scalar per
    token, so the normalised [N, D] copy is never made; the backward is one pass over x (autograd's through
    vector_norm takes three) and x is saved in its own dtype (no fp32 copy of bf16 streams)."""

    @staticmethod
    def forward(ctx, x, phi):
        xf = _fp32_or_wider(x)
        proj = xf @ phi.to(xf.dtype)
        inv = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_() / xf.size(-1)
                          + _rms_eps(xf))                                       # [N, 1], F.rms_norm's epsilon
        ctx.save_for_backward(x, phi, inv)
        return proj, inv

    @staticmethod
    def backward(ctx, g_proj, g_inv):
        x, phi, inv = ctx.saved_tensors
        xf = _fp32_or_wider(x)
        grad_x = grad_phi = None
        if ctx.needs_input_grad[0]:
            grad_x = (g_proj @ phi.to(xf.dtype).T).addcmul_(xf, g_inv * inv.pow(3) / -xf.size(-1)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_phi = (xf.T @ g_proj).to(phi.dtype)
        return grad_x, grad_phi


def _normed_projection(x: torch.Tensor, phi: torch.Tensor):
    return _NormedProjection.apply(x, phi)


# -- the connection -------------------------------------------------------------------------------------------------

class Residual(nn.Module):
    """A connection with mHC disabled: the plain pre-norm residual x + branch(RMSNorm(x)), with DynamicMHC's calling
    convention, so the baseline and the mHC model share one block. No parameters."""

    def forward(self, x: torch.Tensor, branch_fn) -> torch.Tensor:
        return x + branch_fn(F.rms_norm(x, (x.size(-1),)))


def make_connection(dim: int, cfg: MHCConfig, index: int) -> nn.Module:
    """The connection around sub-layer `index` (attention 2i, MLP 2i + 1): DynamicMHC, or Residual when mHC is
    disabled. Either applies the branch's parameter-free pre-norm itself."""
    return DynamicMHC(dim, cfg, layer_idx=index, prenorm=True) if cfg.enabled else Residual()


class DynamicMHC(nn.Module):
    """One mHC connection around a branch. forward(x [B, T, n*C], branch_fn) -> [B, T, n*C]. With prenorm the branch
    gets RMSNorm(sum_i H_pre[i] x[i]) (the branch's own pre-norm, computed here), else the plain read-out.
    DynamicMHC(dim, cfg) takes an MHCConfig; keyword overrides of its fields are accepted for convenience
    (DynamicMHC(8, num_streams=2)). Validated here, once."""

    def __init__(self, dim: int, cfg: MHCConfig | None = None, layer_idx: int = 0, prenorm: bool = False,
                 **overrides):
        super().__init__()
        cfg = replace(cfg or MHCConfig(), enabled=True, **overrides).validate()
        n = cfg.num_streams
        self.cfg, self.dim, self.num_streams, self.layer_idx = cfg, dim, n, layer_idx
        self.sinkhorn_iters, self.sinkhorn_tau, self.dynamic = cfg.sinkhorn_iters, cfg.sinkhorn_tau, cfg.dynamic
        self.constraint = cfg.constraint
        self.project = CONSTRAINTS[cfg.constraint].project  # [..., n, n] logits -> H_res
        self.ns_coeffs = resolve_ns_coeffs(cfg.ns_coeffs) if cfg.constraint == "orthostochastic" else None
        self.gate_noise, self.gate_sample_frac = cfg.gate_noise, cfg.gate_sample_frac  # run state (freeze: 0)
        self.capture = False       # set by GPT.capture_mhc(); when on, forward keeps the last matrices
        self.captured: dict = {}
        # the branch's parameter-free pre-norm, folded into the read-out (GPT's blocks): the un-normalised read-out
        # is then never stored for backward
        self.prenorm = prenorm
        self.recompute = False     # run state (GPT.set_activation_checkpointing): recompute _read_and_mix in backward
        # dynamic part: one fused projection to [pre n | post n | res n*n] logits, and three scalar gains
        self.phi = nn.Parameter(torch.empty(n * dim, n * n + 2 * n)) if cfg.dynamic else None
        self.alpha = nn.Parameter(torch.empty(3)) if cfg.dynamic else None  # alpha_pre, alpha_post, alpha_res
        # static part
        self.b_pre = nn.Parameter(torch.empty(n))
        self.b_post = nn.Parameter(torch.empty(n))
        self.b_res = nn.Parameter(torch.empty(n, n))
        self.gate_learnable = cfg.gate_learnable
        if cfg.gate_learnable:
            self.gate_logit = nn.Parameter(torch.empty(()))
        else:
            self.register_buffer("gate_fixed", torch.empty(()))
        # gate set by the controller: None, a 0-d tensor, or one gate per example [B]. Run state, so a plain
        # attribute rather than a buffer: it is never saved in a checkpoint
        self.gate_override: torch.Tensor | None = None
        # Sinkhorn iterations at inference (set_inference_sinkhorn_iters): None = the config's. Run state, never saved
        self.inference_sinkhorn_iters: int | None = None
        self.register_buffer("eye", torch.eye(n), persistent=False)
        # which alpha scales each of the n*n + 2n logits (a constant: [pre n | post n | res n*n])
        self.register_buffer("alpha_index", torch.tensor([0] * n + [1] * n + [2] * (n * n)), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        n, cfg = self.num_streams, self.cfg
        eye = torch.eye(n, device="cpu")  # init values are built on the CPU (this also runs under the meta device)
        if self.dynamic:
            nn.init.normal_(self.phi, std=(n * self.dim) ** -0.5)  # v has unit RMS: logits ~ N(0, 1) before alpha
            self.alpha.fill_(cfg.alpha_init)
        self.b_pre.copy_(_preference_bias(n, self.layer_idx))
        self.b_post.zero_()
        self.b_res.copy_(CONSTRAINTS[self.constraint].init_logits(n, cfg.res_init_diag, self))
        if self.gate_learnable:
            self.gate_logit.fill_(math.log(cfg.gate_init / (1 - cfg.gate_init)))
        else:
            self.gate_fixed.fill_(cfg.gate_init)
        self.gate_override = None
        self.eye.copy_(eye)
        self.alpha_index.copy_(torch.tensor([0] * n + [1] * n + [2] * (n * n)))

    # -- gate -----------------------------------------------------------------------------------------------------
    def set_gate(self, value):
        """Override the gate: a number in [0, 1] (python, numpy or a 0-d tensor) or one per example, shape [B]."""
        g = gate_tensor(value, "gate")
        if g.dim() > 1:
            raise UserError(f"mHC gate: expected one value or one per example [B], got shape {tuple(g.shape)}")
        self.gate_override = g.to(self.b_pre.device)

    def clear_gate(self):
        self.gate_override = None

    def gate(self) -> torch.Tensor:
        """The effective gate: the controller's value if set ([] or [B]), else sigmoid(gate_logit) (or the fixed
        value)."""
        if self.gate_override is not None:
            return self.gate_override
        return torch.sigmoid(self.gate_logit) if self.gate_learnable else self.gate_fixed

    # -- inference-time Sinkhorn -----------------------------------------------------------------------------------
    def set_inference_sinkhorn_iters(self, k: int | None):
        """Run k Sinkhorn iterations instead of sinkhorn_iters when inferring (eval mode, grad disabled); None = the
        config's count (exact). Fewer iterations leave the columns further from summing to 1 (the last step is the
        row step); benchmarks/sinkhorn_inference.py measures what that does to the logits. Under torch.compile a new
        k is a recompile (the count is a Python int read in forward)."""
        if k is not None:
            if self.constraint != INFERENCE_ITERS_CONSTRAINT:
                raise UserError(f"inference Sinkhorn iterations apply to the {INFERENCE_ITERS_CONSTRAINT} constraint "
                                f"only; this model's H_res constraint is {self.constraint!r}")
            if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= self.sinkhorn_iters:
                raise UserError(f"inference Sinkhorn iterations must be an integer in [1, {self.sinkhorn_iters}] (the "
                                f"trained mhc_sinkhorn_iters), or None for all of them (got {k!r})")
            k = int(k)
        self.inference_sinkhorn_iters = k

    def _sinkhorn_iters_now(self) -> int:
        """The Sinkhorn iterations of this forward: the inference setting in eval mode with grad disabled, else the
        config's (training and anything that backpropagates go through the steps the model was trained with). No
        early exit when the sums have converged: a data-dependent loop would break compiled graphs."""
        if self.inference_sinkhorn_iters is not None and not self.training and not torch.is_grad_enabled():
            return self.inference_sinkhorn_iters
        return self.sinkhorn_iters

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the override became run state hold it as a buffer: it is not a weight
        state_dict.pop(prefix + "gate_override", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _row_gates(self, B: int) -> torch.Tensor:
        """The gate of this forward: [] (one for the batch) or [B] (per example; overrides and gate sampling)."""
        g = self.gate()
        if g.dim() == 1 and g.numel() != B:
            raise UserError(f"mHC per-example gates: {g.numel()} gates set for a batch of {B} rows")
        if self.training and self.gate_noise > 0:
            noise = torch.empty((), device=g.device).uniform_(1 - self.gate_noise, 1 + self.gate_noise)
            g = (g * noise).clamp(0, 1)
        if self.training and self.gate_sample_frac > 0:
            sampled = torch.rand(B, device=g.device) < self.gate_sample_frac
            g = torch.where(sampled, torch.rand(B, device=g.device), g)                  # [B]
        return g

    def _gated(self, H_res: torch.Tensor, g: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """(1 - g) I + g H_res. H_res: [N', n, n] with N' = B*T (dynamic) or 1 (static); g: [] or [B].
        Returns [N', n, n] for one gate, [B*T, n, n] (or [B, n, n] when static) for per-example gates."""
        eye = self.eye.to(H_res.dtype)
        if g.dim() == 0:
            return torch.lerp(eye, H_res, g.to(H_res.dtype))
        n = self.num_streams
        rows = H_res.reshape(B, T, n, n) if H_res.size(0) == B * T else H_res.reshape(1, 1, n, n)
        out = torch.lerp(eye, rows, g.to(H_res.dtype).view(B, 1, 1, 1))                   # [B, T or 1, n, n]
        return out.reshape(-1, n, n)

    # -- matrices -------------------------------------------------------------------------------------------------
    def _coefficients(self, x: torch.Tensor, B: int, T: int):
        """x: [N = B*T, n*C] streams (fp32, or bf16 streams) -> H_res [N', n, n], H_pre [N', n], H_post [N', n] in
        fp32 (float64 for float64 streams) with N' = N (dynamic) or 1 (static: one set of matrices shared by every
        token; H_res is [B, n, n] under per-example gates)."""
        n = self.num_streams
        bias = torch.cat([self.b_pre, self.b_post, self.b_res.flatten()])             # [n*n + 2n]
        if self.dynamic:
            # alpha * (RMSNorm(x) @ phi) + b, with the norm applied to the logits (one scalar per token)
            proj, inv = _normed_projection(x, self.phi)                              # [N, n*n + 2n], [N, 1]
            logits = torch.addcmul(bias, proj, inv * self.alpha[self.alpha_index])
        else:
            logits = bias[None]
        H_pre = torch.sigmoid(logits[:, :n])
        H_post = 2 * torch.sigmoid(logits[:, n:2 * n])
        H_res = self.project(logits[:, 2 * n:].reshape(-1, n, n), self)               # [N', n, n]
        H_res = self._gated(H_res, self._row_gates(B), B, T)                          # (1 - g) I + g H_res
        return H_res, H_pre, H_post

    def get_matrices(self, x: torch.Tensor):
        """x: [B, T, n*C] -> H_res [B, T, n, n], H_pre [B, T, n], H_post [B, T, n] (all fp32)."""
        B, T, nC = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            H_res, H_pre, H_post = self._coefficients(x.reshape(B * T, nC), B, T)
        return _per_token(H_res, B, T), _per_token(H_pre, B, T), _per_token(H_post, B, T)

    def forward(self, x: torch.Tensor, branch_fn) -> torch.Tensor:
        """x: [B, T, n*C] streams -> [B, T, n*C] in the streams' dtype. branch_fn gets the read-out [B, T, C]
        (RMS-normalised when `prenorm`) in the dtype the branch computes in (autocast's under autocast, else the
        streams'), and returns the branch output y [B, T, C]."""
        B, T, nC = x.shape
        device_type = x.device.type
        branch_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        if self.recompute and torch.is_grad_enabled():  # --activation-checkpointing mhc: recomputed in backward
            branch_in, mixed, H_post = checkpoint(self._read_and_mix, x, branch_dtype, use_reentrant=False)
        else:
            branch_in, mixed, H_post = self._read_and_mix(x, branch_dtype)
        y = branch_fn(branch_in.view(B, T, -1))                                       # [B, T, C]
        # the write-back runs outside autocast: the streams keep their own precision (fp32 by default, as the
        # baseline's x + y), and bf16 streams still accumulate in fp32
        with torch.autocast(device_type=device_type, enabled=False):
            out = _WriteBack.apply(mixed, H_post, y.reshape(B * T, -1), x.dtype)      # H_res x + H_post y
        return out.view(B, T, nC)

    def _read_and_mix(self, x: torch.Tensor, branch_dtype: torch.dtype):
        """x [B, T, n*C] -> (branch input [N, C] in branch_dtype, H_res x [N, n, C], H_post [N, n]): the coefficient
        math, the read-out and the mixing, in fp32 outside autocast. What --activation-checkpointing mhc
        recomputes: only x, H_post and the branch output stay saved for backward."""
        B, T, nC = x.shape
        n, N = self.num_streams, B * T
        with torch.autocast(device_type=x.device.type, enabled=False):
            H_res, H_pre, H_post = (_per_token(H, B, T).reshape(N, *H.shape[1:])
                                    for H in self._coefficients(x.reshape(N, nC), B, T))
            if self.capture:
                self.captured = dict(H_res=H_res.detach().reshape(B, T, n, n), H_pre=H_pre.detach().reshape(B, T, n),
                                     H_post=H_post.detach().reshape(B, T, n))
            branch_in, mixed = _ReadMixStreams.apply(H_pre.contiguous(), H_res.contiguous(), x.reshape(N, n, nC // n),
                                                     self.prenorm, branch_dtype)
        return branch_in, mixed, H_post.contiguous()


def _per_token(H: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """[N', ...] coefficients with N' in {1, B, B*T} (shared, per example, per token) -> a [B, T, ...] view."""
    if H.size(0) == B * T:
        return H.reshape(B, T, *H.shape[1:])
    if H.size(0) == 1:
        return H.reshape(1, 1, *H.shape[1:]).expand(B, T, *H.shape[1:])
    return H.reshape(B, 1, *H.shape[1:]).expand(B, T, *H.shape[1:])


class StreamReadout(nn.Module):
    """The final collapse of the n streams into the head's input: sum_i H_out[i] x[i] with
    H_out = sigmoid(alpha * (RMSNorm(x) @ phi) + b), i.e. an H_pre for the LM head (as DeepSeek-V4's `hc_head`).

    Why not HC's plain sum: for any column-stochastic H_res, sum_i (H_res x)_i = sum_j x_j, so under a plain sum
    the last sub-layer's H_res -- and its gate, one of the RL controller's knobs -- cancels exactly and never gets a
    gradient. `GPTConfig.mhc_readout = "sum"` keeps HC's sum for comparison. Initialised like the H_pre of
    sub-layer `index` (0.73 on stream index mod n, 0.5 elsewhere); the final RMSNorm removes the overall scale."""

    def __init__(self, dim: int, num_streams: int, index: int, alpha_init: float = 0.01):
        super().__init__()
        self.dim, self.num_streams, self.index, self.alpha_init = dim, num_streams, index, alpha_init
        self.phi = nn.Parameter(torch.empty(num_streams * dim, num_streams))
        self.alpha = nn.Parameter(torch.empty(()))
        self.b = nn.Parameter(torch.empty(num_streams))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.phi, std=(self.num_streams * self.dim) ** -0.5)
        self.alpha.fill_(self.alpha_init)
        self.b.copy_(_preference_bias(self.num_streams, self.index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, nC = x.shape
        n, N = self.num_streams, B * T
        with torch.autocast(device_type=x.device.type, enabled=False):
            proj, inv = _normed_projection(x.reshape(N, nC), self.phi)
            H_out = torch.sigmoid(torch.addcmul(self.b, proj, inv * self.alpha))        # [N, n]
            # un-normalised and in fp32 (float64 for float64 streams): the model's final RMSNorm follows
            out = _ReadStreams.apply(H_out, x.reshape(N, n, nC // n), False, H_out.dtype)
            return out.view(B, T, nC // n)


class StreamEnds(nn.Module):
    """Where the n streams begin and end. expand: [B, T, C] -> [B, T, n*C], the input replicated into n streams plus
    a zero-mean learnable stream embedding (it makes the copies differ without moving their mean: H_pre's and the
    read-out's stream preferences, 0.73 vs 0.5, see the differences from step 0); in bf16 under autocast with
    bf16_streams. reduce: [B, T, n*C] -> [B, T, C], the learned read-out (StreamReadout) or HC's plain sum. With
    mHC disabled both are the identity; one stream needs no embedding and has nothing to read out."""

    def __init__(self, dim: int, cfg: MHCConfig, index: int, init: bool = True):
        super().__init__()
        self.enabled, self.num_streams = cfg.enabled, cfg.num_streams
        self.embed_std, self.bf16_streams = cfg.stream_embed_std, cfg.bf16_streams
        several = cfg.enabled and cfg.num_streams > 1
        self.embed = nn.Parameter(torch.empty(cfg.num_streams, dim)) if several else None
        self.readout = (StreamReadout(dim, cfg.num_streams, index, alpha_init=cfg.alpha_init)
                        if several and cfg.readout == "learned" else None)
        if init and self.embed is not None:  # (GPT initialises it in init_weights, with everything else)
            nn.init.normal_(self.embed, std=self.embed_std)

    @torch.no_grad()
    def reset_parameters(self):
        if self.embed is not None:
            nn.init.normal_(self.embed, std=self.embed_std)
        if self.readout is not None:
            self.readout.reset_parameters()

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        x = einops.repeat(x, "b t c -> b t n c", n=self.num_streams)
        if self.embed is not None:  # zero-mean over the streams
            x = x + (self.embed - self.embed.mean(dim=0)).to(x.dtype)
        x = einops.rearrange(x, "b t n c -> b t (n c)")
        if self.bf16_streams and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # the streams' dtype from here to the read-out
        return x

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.readout is not None:
            return self.readout(x)
        return einops.reduce(x, "b t (n c) -> b t c", "sum", n=self.num_streams)


class GateController:
    """The gates of a model's 2L connections as an RL controller sets them; the connections in order: layer 0
    attention, layer 0 MLP, layer 1 attention, ... Values may be python or numpy numbers, 0-d arrays or tensors,
    arrays or tensors (a gymnasium Box action is one), each in [0, 1]; a leading batch dimension [B, k] gives every
    row of a batch its own gates (a batch of rollouts in one forward). An override is run state, never saved."""

    def __init__(self, connections: list, n_layer: int):
        self.connections, self.n_layer = connections, n_layer

    def set_global(self, value):
        """One value for every sub-layer, or one per example ([B])."""
        g = gate_tensor(value, "gate")
        if g.dim() > 1:
            raise UserError(f"set_mhc_gate: expected one gate or one per example [B], got shape {tuple(g.shape)}")
        self._apply(g.unsqueeze(-1).expand(*g.shape, len(self.connections)), 1)

    def set_per_layer(self, values):
        """values[i] overrides both sub-layers of layer i: [L], or [B, L]."""
        self._apply(self._matrix(values, self.n_layer, "per layer"), 2)

    def set_per_sublayer(self, values):
        """values[j] overrides sub-layer j: [2L], or [B, 2L]."""
        self._apply(self._matrix(values, len(self.connections), "per sub-layer"), 1)

    def set_by_count(self, values, source: str = "gates"):
        """One flat vector whose length says what it sets: 1 (every sub-layer), L (per layer) or 2L (per sub-layer)."""
        values = [float(v) for v in values]
        L = self.n_layer
        setters = {1: lambda v: self.set_global(v[0]), L: self.set_per_layer, 2 * L: self.set_per_sublayer}
        if len(values) not in setters:
            raise UserError(f"{source}: {len(values)} gate values; this model takes 1 (global), {L} (per layer) or "
                            f"{2 * L} (per sub-layer)")
        setters[len(values)](values)

    def clear(self):
        """Every gate back to its learned (or fixed) value."""
        for c in self.connections:
            c.clear_gate()

    def tensor(self) -> torch.Tensor:
        """The effective gates: [2L], or [B, 2L] while per-example overrides are set."""
        gates = [c.gate().detach().float().cpu() for c in self.connections]
        B = max((g.numel() for g in gates if g.dim() == 1), default=0)
        if B:
            return torch.stack([g.expand(B) for g in gates], dim=-1)
        return torch.stack(gates)

    def _matrix(self, values, expected: int, what: str) -> torch.Tensor:
        g = gate_tensor(values, "gate")
        if g.dim() not in (1, 2) or g.size(-1) != expected:
            got = f"{g.size(-1)}" if g.dim() in (1, 2) else f"shape {tuple(g.shape)}"
            raise UserError(f"expected {expected} gate values {what}, got {got} (shape [{expected}] or "
                            f"[B, {expected}] for one vector per example)")
        return g

    def _apply(self, gates: torch.Tensor, repeat: int):
        """gates: [k] or [B, k] checked values; sub-layer j takes column j // repeat."""
        for j, c in enumerate(self.connections):
            c.gate_override = gates[..., j // repeat].contiguous().to(c.b_pre.device)


def connection_stats(captured: dict, gate: float) -> dict:
    """What one sub-layer's connection does, from its captured matrices (GPT.capture_mhc; H_res [..., n, n], H_pre
    and H_post [..., n]) averaged over the tokens: the gate, H_res's mean diagonal, its mean absolute distance from
    the identity, its worst row/column-sum error (still doubly stochastic?), and the mean H_pre and H_post per
    stream. Logged during training (--mhc-log-every) and reported by analysis.mhc_stats."""
    H = captured["H_res"].flatten(0, -3).float()                                      # [M, n, n]
    eye = torch.eye(H.size(-1), device=H.device)
    return dict(
        gate=float(gate),
        h_res_mean_diag=H.diagonal(dim1=-2, dim2=-1).mean().item(),
        h_res_dist_identity=(H - eye).abs().mean().item(),
        h_res_max_sum_error=max((H.sum(-1) - 1).abs().max().item(), (H.sum(-2) - 1).abs().max().item()),
        h_pre_mean=captured["H_pre"].flatten(0, -2).float().mean(0).tolist(),
        h_post_mean=captured["H_post"].flatten(0, -2).float().mean(0).tolist())


def gate_tensor(values, name: str = "gate") -> torch.Tensor:
    """Gate value(s) as a float32 tensor, checked: a number (python, numpy scalar, 0-d array or tensor) or an array
    or tensor of numbers, every one finite and in [0, 1]. The error names the first bad entry."""
    if isinstance(values, (str, bytes, bool, np.bool_)) or values is None:
        raise UserError(f"mHC {name} must be a number in [0, 1] (got {values!r})")
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise UserError(f"mHC {name}: cannot read {values!r} as gate values ({e})") from None
    if arr.dtype.kind not in "fiu":
        raise UserError(f"mHC {name} must be a number in [0, 1] (got {values!r})")
    arr = arr.astype(np.float64)
    ok = np.isfinite(arr) & (arr >= 0) & (arr <= 1)
    if not ok.all():
        first = tuple(np.argwhere(~ok)[0]) if arr.ndim else ()
        where = name + "".join(f"[{i}]" for i in first)
        raise UserError(f"mHC {where} must be a number in [0, 1] (got {float(arr[first])!r})")
    return torch.from_numpy(arr.astype(np.float32))
