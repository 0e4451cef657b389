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

Design decisions (the paper leaves them open; DESIGN.md §4-5):
- Initialisation. b_res = D on the diagonal, 0 off it, with D chosen so that Sinkhorn(b_res) has diagonal
  `res_init_diag` (0.95): H_res ~ I at step 0, yet far from the saturation where exp() underflows and the gradient
  vanishes (the public repos' tau = 0.05 with -8 logits gives exp(-160) = 0: exactly I, exactly zero gradient).
  b_pre = b_post = 0: H_pre = 0.5 on every stream (a uniform read-out; the branch's RMSNorm makes its scale
  irrelevant) and H_post = 1 (every stream receives the branch output). phi ~ N(0, 1/(nC)) and alpha = 0.01, so the
  dynamic part starts as a ~1% perturbation with a non-zero gradient for phi *and* alpha.
  With identical streams this start is exactly the plain residual network; the learnable stream embedding in GPT
  breaks the symmetry between streams, which H_res needs to receive a gradient at all.
- Gate. g = sigmoid(gate_logit), learned by default, initialised to `gate_init` (0.9: mostly the learned mixing,
  with gradient room both ways). The RL controller overrides it with set_gate(v), v in [0, 1] (v = 1: full mHC,
  v = 0: identity mixing); clear_gate() returns to the learned value. Training-time gate noise multiplies g by
  U[1 - noise, 1 + noise] and clamps to [0, 1], so H_res stays doubly stochastic.
- Orthostochastic alternative: H_res = NS(logits) ** 2 elementwise (rows/columns sum to 1 when NS has converged,
  hence the 8-step schedule by default). Its b_res starts at I + delta * S (S skew-symmetric) so that H_res ~ I
  with a non-zero gradient (at exactly I the gradient of O*O vanishes).
- Coefficient math (norm, projection, Sinkhorn, NS) runs in fp32 whatever the autocast dtype.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.newton_schulz import resolve_ns_coeffs, zeropower_via_newtonschulz

CONSTRAINTS = ("sinkhorn", "orthostochastic")
# H_pre of sub-layer k starts at sigmoid(1) = 0.73 on stream k mod n and 0.5 elsewhere: a mild preference that makes
# the read-out see stream differences (so H_res and the gate get a first-order gradient) without saturating sigmoid
PRE_PREFERENCE_LOGIT = 1.0


def _fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """Coefficient math runs in fp32 (bf16/fp16 are too coarse for Sinkhorn/NS); float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def sinkhorn_log(logits: torch.Tensor, num_iters: int = 20, tau: float = 1.0) -> torch.Tensor:
    """Sinkhorn-Knopp in log space: [..., n, n] logits -> doubly stochastic matrices (fp32 whatever the input).

    Starts from exp(logits / tau) and alternates column and row normalisation (T_r(T_c(M)), as the paper); after
    the final row step rows sum to 1 exactly and columns within the Sinkhorn tolerance. Log space keeps extreme
    logits (+-1e4) finite.
    """
    log_m = _fp32_or_wider(logits) / tau
    for _ in range(num_iters):
        log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)  # columns
        log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)  # rows
    return log_m.exp()


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
    """I + delta * S, S_ij = sign(j - i): its polar factor is a small rotation, so (O*O) has diagonal ~ `diag`."""
    S = torch.ones(n, n, device="cpu").triu(1) - torch.ones(n, n, device="cpu").tril(-1)  # cpu: also under meta
    # bisection on delta: the diagonal of (polar(I + delta S))^2 decreases monotonically in delta on [0, 1]
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        U, _, Vh = torch.linalg.svd(torch.eye(n, dtype=torch.float64, device="cpu") + mid * S.double())
        mean_diag = (U @ Vh).diagonal().square().mean().item()
        lo, hi = (mid, hi) if mean_diag > diag else (lo, mid)
    return torch.eye(n, device="cpu") + lo * S


class DynamicMHC(nn.Module):
    """One mHC connection around a branch. forward(x [B, T, n*C], branch_fn) -> [B, T, n*C]."""

    def __init__(self, dim: int, num_streams: int = 4, sinkhorn_iters: int = 20, sinkhorn_tau: float = 1.0,
                 layer_idx: int = 0, constraint: str = "sinkhorn", ns_coeffs="handover8", dynamic: bool = True,
                 alpha_init: float = 0.01, res_init_diag: float = 0.95, gate_init: float = 0.9,
                 gate_learnable: bool = True, gate_noise: float = 0.0):
        super().__init__()
        validate_mhc_args(num_streams, sinkhorn_iters, sinkhorn_tau, constraint, res_init_diag, gate_init,
                          gate_learnable, gate_noise)
        n = num_streams
        self.dim, self.num_streams, self.layer_idx = dim, n, layer_idx
        self.sinkhorn_iters, self.sinkhorn_tau = sinkhorn_iters, sinkhorn_tau
        self.constraint, self.dynamic, self.gate_noise = constraint, dynamic, gate_noise
        self.ns_coeffs = resolve_ns_coeffs(ns_coeffs) if constraint == "orthostochastic" else None
        self.alpha_init, self.res_init_diag, self.gate_init = alpha_init, res_init_diag, gate_init
        self.capture = False       # set by GPT.capture_mhc(); when on, forward keeps the last matrices
        self.captured: dict = {}
        # dynamic part: one fused projection to [pre n | post n | res n*n] logits, and three scalar gains
        self.phi = nn.Parameter(torch.empty(n * dim, n * n + 2 * n)) if dynamic else None
        self.alpha = nn.Parameter(torch.empty(3)) if dynamic else None  # alpha_pre, alpha_post, alpha_res
        # static part
        self.b_pre = nn.Parameter(torch.empty(n))
        self.b_post = nn.Parameter(torch.empty(n))
        self.b_res = nn.Parameter(torch.empty(n, n))
        self.gate_learnable = gate_learnable
        if gate_learnable:
            self.gate_logit = nn.Parameter(torch.empty(()))
        else:
            self.register_buffer("gate_fixed", torch.empty(()))
        # gate set by the controller: NaN = none (a buffer, so no Python branch on its value inside forward)
        self.register_buffer("gate_override", torch.full((), float("nan")))
        self.register_buffer("eye", torch.eye(n), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        n = self.num_streams
        eye = torch.eye(n, device="cpu")  # init values are built on the CPU (this also runs under the meta device)
        if self.dynamic:
            nn.init.normal_(self.phi, std=(n * self.dim) ** -0.5)  # v has unit RMS: logits ~ N(0, 1) before alpha
            self.alpha.fill_(self.alpha_init)
        self.b_pre.zero_()
        self.b_pre[self.layer_idx % n] = PRE_PREFERENCE_LOGIT  # as HC's A_m = e_(k mod n): sub-layers read differently
        self.b_post.zero_()
        if self.constraint == "sinkhorn":
            # symmetric start: Sinkhorn is exact on it (asymmetric near-permutation starts converge slowly)
            self.b_res.copy_(eye * _sinkhorn_diag_logit(n, self.res_init_diag) * self.sinkhorn_tau)
        else:
            self.b_res.copy_(_ortho_init_logits(n, self.res_init_diag))  # copy_: the cached tensor stays intact
        if self.gate_learnable:
            self.gate_logit.fill_(math.log(self.gate_init / (1 - self.gate_init)))
        else:
            self.gate_fixed.fill_(self.gate_init)
        self.gate_override.fill_(float("nan"))
        self.eye.copy_(eye)

    # -- gate -----------------------------------------------------------------------------------------------------
    def set_gate(self, value: float):
        check_gate_value(value, "gate")
        self.gate_override.fill_(float(value))

    def clear_gate(self):
        self.gate_override.fill_(float("nan"))

    def gate(self) -> torch.Tensor:
        """The effective gate: the controller's value if set, else sigmoid(gate_logit) (or the fixed value)."""
        base = torch.sigmoid(self.gate_logit) if self.gate_learnable else self.gate_fixed
        return torch.where(torch.isnan(self.gate_override), base, self.gate_override)

    # -- matrices -------------------------------------------------------------------------------------------------
    def get_matrices(self, x: torch.Tensor):
        """x: [B, T, n*C] -> H_res [B, T, n, n], H_pre [B, T, n], H_post [B, T, n] (all fp32)."""
        B, T, _ = x.shape
        n = self.num_streams
        if self.dynamic:
            with torch.autocast(device_type=x.device.type, enabled=False):
                xf = _fp32_or_wider(x)
                v = F.rms_norm(xf, (x.size(-1),))
                logits = v @ self.phi.to(xf.dtype)                           # [B, T, n*n + 2n]
            pre = self.alpha[0] * logits[..., :n] + self.b_pre
            post = self.alpha[1] * logits[..., n:2 * n] + self.b_post
            res = self.alpha[2] * logits[..., 2 * n:].view(B, T, n, n) + self.b_res
        else:  # static ablation: the biases alone, shared by every token
            pre = self.b_pre.expand(B, T, n)
            post = self.b_post.expand(B, T, n)
            res = self.b_res.expand(B, T, n, n)
        H_pre = torch.sigmoid(pre)
        H_post = 2 * torch.sigmoid(post)
        if self.constraint == "sinkhorn":
            H_res = sinkhorn_log(res, self.sinkhorn_iters, self.sinkhorn_tau)
        else:
            H_res = orthostochastic_project(res, self.ns_coeffs)
        g = self.gate()
        if self.training and self.gate_noise > 0:
            g = (g * torch.empty((), device=g.device).uniform_(1 - self.gate_noise, 1 + self.gate_noise)).clamp(0, 1)
        H_res = (1 - g) * self.eye + g * H_res
        return H_res, H_pre, H_post

    def forward(self, x: torch.Tensor, branch_fn) -> torch.Tensor:
        B, T, nC = x.shape
        n = self.num_streams
        H_res, H_pre, H_post = self.get_matrices(x)
        if self.capture:
            self.captured = dict(H_res=H_res.detach(), H_pre=H_pre.detach(), H_post=H_post.detach())
        C = nC // n
        xs = x.view(B * T, n, C)                                              # [BT, n, C]
        # stream read-out and mixing outside autocast: the residual streams stay in their own (fp32) precision,
        # as the baseline's x + y does; these are tiny [n x n] batched matmuls, memory-bound anyway
        with torch.autocast(device_type=x.device.type, enabled=False):
            branch_in = (H_pre.view(B * T, 1, n).to(x.dtype) @ xs).view(B, T, C)  # [B, T, C]
        y = branch_fn(branch_in)                                              # [B, T, C]
        with torch.autocast(device_type=x.device.type, enabled=False):
            mixed = H_res.view(B * T, n, n).to(x.dtype) @ xs                  # [BT, n, C]
            out = mixed + H_post.view(B * T, n, 1).to(x.dtype) * y.view(B * T, 1, C).to(x.dtype)
        return out.view(B, T, nC)


def check_gate_value(value, name: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
        raise UserError(f"mHC {name} must be a number in [0, 1] (got {value!r})")


def validate_mhc_args(num_streams, sinkhorn_iters, sinkhorn_tau, constraint, res_init_diag, gate_init,
                      gate_learnable, gate_noise):
    if not isinstance(num_streams, int) or num_streams < 1:
        raise UserError(f"mhc_num_streams must be an integer >= 1 (got {num_streams!r})")
    if not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 1:
        raise UserError(f"mhc_sinkhorn_iters must be an integer >= 1 (got {sinkhorn_iters!r})")
    if not sinkhorn_tau > 0:
        raise UserError(f"mhc_sinkhorn_tau must be > 0 (got {sinkhorn_tau!r})")
    if constraint not in CONSTRAINTS:
        raise UserError(f"mhc_constraint must be one of {', '.join(CONSTRAINTS)} (got {constraint!r})")
    if num_streams > 1 and not 1 / num_streams < res_init_diag < 1:
        raise UserError(f"mhc_res_init_diag must be in (1/n, 1) = ({1 / num_streams:.3f}, 1) "
                        f"(got {res_init_diag!r})")
    if gate_learnable and not 0 < gate_init < 1:
        raise UserError(f"mhc_gate_init must be in (0, 1) for a learned gate (sigmoid never reaches 0 or 1); "
                        f"got {gate_init!r} (use mhc_gate_learnable=false to fix the gate at 0 or 1)")
    if not gate_learnable and not 0 <= gate_init <= 1:
        raise UserError(f"mhc_gate_init must be in [0, 1] (got {gate_init!r})")
    if not 0 <= gate_noise <= 1:
        raise UserError(f"mhc_gate_noise must be in [0, 1] (got {gate_noise!r})")
