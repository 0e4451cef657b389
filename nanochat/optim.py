"""Optimizers and schedules: Muon for hidden 2-D matrices, AdamW for embeddings, head and scalars (nanochat)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from nanochat.common import UserError
from nanochat.newton_schulz import QUINTIC, ns_schedule, resolve_ns_coeffs, zeropower_via_newtonschulz


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz (Keller Jordan).

    Per 2-D parameter: Nesterov momentum, then the update is orthogonalised by Newton–Schulz, scaled by
    sqrt(max(1, rows/cols)) so tall and wide matrices get the same RMS update, with decoupled weight decay.
    Parameters of equal shape form one group and are orthogonalised in one batched NS call.

    Distributed (torch.distributed initialised with world size > 1, or distributed=True): the gradients are already
    averaged (DDP), so every rank updates the momentum of every matrix (cheap, elementwise; it keeps the optimizer
    state identical on all ranks, so rank 0's checkpoint is complete), but each rank orthogonalises only its share
    of each shape group -- matrices r, r + W, r + 2W, ... (round-robin, as KellerJordan/Muon), zero-padded so every
    rank does the same work -- and one all_gather per group hands every rank all the updates. The result equals the
    single-process optimizer (tests/test_optim.py runs it on 2 gloo processes).

    orthogonalizer: optional function [N, m, n] -> [N, m, n] replacing the NS call (the NS ablation uses it);
    by default zeropower_via_newtonschulz(update, ns_coeffs, ns_steps, ns_dtype).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0,
                 ns_coeffs=QUINTIC, ns_steps=None, ns_dtype=torch.bfloat16, orthogonalizer=None, distributed=None):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("Muon only takes 2-D parameters; put embeddings, heads and scalars in AdamW")
        ns_coeffs = resolve_ns_coeffs(ns_coeffs)  # a preset name or a literal; fails here, not at the first step
        ns_schedule(ns_coeffs, ns_steps)
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [dict(params=[p for p in params if tuple(p.shape) == s]) for s in shapes]
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_coeffs=ns_coeffs, ns_steps=ns_steps, ns_dtype=ns_dtype)
        super().__init__(groups, defaults)
        self.orthogonalizer = orthogonalizer
        self.distributed = distributed  # None: decide at each step from torch.distributed

    def _orthogonalize(self, update: torch.Tensor, group: dict) -> torch.Tensor:
        if self.orthogonalizer is not None:
            return self.orthogonalizer(update)
        return zeropower_via_newtonschulz(update, group["ns_coeffs"], group["ns_steps"], group["ns_dtype"])

    def _orthogonalize_sharded(self, update: torch.Tensor, group: dict) -> torch.Tensor:
        """Rank r orthogonalises update[r::W] (zero-padded to equal length on all ranks), then all_gather."""
        world, rank = dist.get_world_size(), dist.get_rank()
        n = update.size(0)
        per_rank = -(-n // world)  # ceil: the padding makes every rank do the same work (NS of 0 is 0)
        padded = torch.zeros(per_rank * world, *update.shape[1:], dtype=update.dtype, device=update.device)
        padded[:n] = update
        mine = self._orthogonalize(padded[rank::world].contiguous(), group)
        gathered = torch.empty(world * per_rank, *update.shape[1:], dtype=mine.dtype, device=mine.device)
        # all_gather_single is torch 2.13's name for all_gather_into_tensor (rank r's block at rows r*per_rank...)
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(gathered, mine)
        # gathered[r, k] is matrix k * world + r: transpose back to the round-robin order
        gathered = gathered.view(world, per_rank, *update.shape[1:])
        return gathered.transpose(0, 1).reshape(per_rank * world, *update.shape[1:])[:n]

    @torch.no_grad()
    def step(self):
        distributed = self.distributed
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = torch.stack([p.grad for p in params])                          # [N, m, n]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            momentum = group["momentum"]
            buf = torch.stack(bufs)
            buf.lerp_(grads, 1 - momentum)                                         # EMA of gradients
            update = grads.lerp(buf, momentum) if group["nesterov"] else buf
            if distributed:
                update = self._orthogonalize_sharded(update, group)
            else:
                update = self._orthogonalize(update, group)
            m, n = params[0].shape
            scale = max(1.0, m / n) ** 0.5
            lr, wd = group["lr"], group["weight_decay"]
            for i, p in enumerate(params):
                bufs[i].copy_(buf[i])
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update[i].to(p.dtype), alpha=-lr * scale)


def setup_optimizers(model, *, embedding_lr, unembedding_lr, matrix_lr, scalar_lr, weight_decay, mhc_lr=0.01,
                     adam_betas=(0.8, 0.95), ns_coeffs=QUINTIC, ns_steps=None, ns_dtype=torch.bfloat16,
                     orthogonalizer=None):
    """Returns [adamw, muon]. AdamW LRs are scaled by 1/sqrt(width/768), nanochat's muP-like rule, so the
    tuned d12 rates transfer across depths; Muon's shape scaling already makes its LR width-independent.
    mHC parameters (model.mhc_parameters(): phi, alpha, biases, gates, stream embedding, read-out) all go to AdamW
    at mhc_lr, without weight decay (as HC's static parts): phi is a thin [n*C, n^2+2n] read-out, not a hidden
    matrix for Muon."""
    if getattr(model.config, "arch", "gpt") == "ngpt":  # silently training nGPT's scales as gpt scalars, unprojected
        raise UserError("this is an nGPT model (arch ngpt): it trains with setup_ngpt_optimizers and a weight "
                        "projection after the steps (scripts/base_train.py); fine-tuning nGPT is not supported yet")
    n_embd = model.config.n_embd
    embed = list(model.transformer.wte.parameters())
    head = list(model.lm_head.parameters())
    mhc = model.mhc_parameters()
    special_ids = {id(p) for p in embed + head + mhc}
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and id(p) not in special_ids]
    scalars = [p for n, p in model.named_parameters() if p.ndim < 2 and id(p) not in special_ids]
    dmodel_lr_scale = (n_embd / 768) ** -0.5
    adam_groups = [
        dict(params=head, lr=unembedding_lr * dmodel_lr_scale),
        dict(params=embed, lr=embedding_lr * dmodel_lr_scale),
    ]
    if scalars:
        adam_groups.append(dict(params=scalars, lr=scalar_lr * dmodel_lr_scale))
    if mhc:
        adam_groups.append(dict(params=mhc, lr=mhc_lr))
    fused = next(model.parameters()).device.type == "cuda"
    # weight decay is applied to the matrices (Muon); embeddings and head are not decayed, as in nanochat
    adamw = torch.optim.AdamW(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=0.0, fused=fused)
    muon = Muon(matrices, lr=matrix_lr, weight_decay=weight_decay, ns_coeffs=ns_coeffs, ns_steps=ns_steps,
                ns_dtype=ns_dtype, orthogonalizer=orthogonalizer)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


NGPT_OTHER_LR_FRAC = 0.3  # the seed's recipe: alpha and the s_* scales at 0.3x the weight LR


def setup_ngpt_optimizers(model, *, lr, optimizer="adamw", matrix_lr=0.02, adam_betas=(0.9, 0.95),
                          ns_coeffs=QUINTIC, ns_steps=None, ns_dtype=torch.bfloat16):
    """nGPT (model.config.arch == "ngpt"): no weight decay anywhere (the weights live on the sphere; decay would
    only fight the projection), AdamW with the reference's betas (0.9, 0.95). Matrices at `lr`, the vectors
    (alpha, s_qk, s_u, s_z) at NGPT_OTHER_LR_FRAC x lr. optimizer="muon": the hidden matrices (q/k/v, output
    projections, c_fc) take Muon at `matrix_lr` instead; wte and lm_head stay on AdamW at `lr`.
    Muon's orthogonalised update has a fixed spectral scale (every singular value lr x shape factor) whatever
    the gradient's size, and it is not tangent to the sphere: the projection that follows drops its radial part
    and rescales each row, so the step that survives is the update's tangential part, and the rows' different
    rescalings make it only approximately orthogonal. Unit rows have entries ~1/sqrt(C), the scale of nanochat's
    init, so Muon's usual LR stays in range. Returns [adamw] or [adamw, muon]."""
    special = {id(model.transformer.wte.weight), id(model.lm_head.weight)}
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    hidden = [p for p in matrices if id(p) not in special]
    adam_matrices = matrices if optimizer == "adamw" else [p for p in matrices if id(p) in special]
    groups = [dict(params=adam_matrices, lr=lr), dict(params=vectors, lr=NGPT_OTHER_LR_FRAC * lr)]
    fused = next(model.parameters()).device.type == "cuda"
    optimizers = [torch.optim.AdamW(groups, betas=adam_betas, weight_decay=0.0, fused=fused)]
    if optimizer == "muon":
        optimizers.append(Muon(hidden, lr=matrix_lr, weight_decay=0.0, ns_coeffs=ns_coeffs, ns_steps=ns_steps,
                               ns_dtype=ns_dtype))
    elif optimizer != "adamw":
        raise ValueError(f"unknown nGPT optimizer {optimizer!r}")
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warmup, constant, then linear warmdown to final_lr_frac (nanochat's trapezoid)."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, ramp_steps: int = 300) -> float:
    """Muon momentum ramps from start to end over the first ramp_steps (modded-nanogpt/nanochat)."""
    frac = min(step / ramp_steps, 1.0) if ramp_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def apply_schedules(optimizers, step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                    final_lr_frac: float) -> float:
    """Set every group's LR to initial_lr x the trapezoid multiplier and Muon's momentum for `step`; returns the
    multiplier. `optimizers` is setup_optimizers' [adamw, muon] (or setup_ngpt_optimizers' list)."""
    lrm = lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = muon_momentum(step)
    return lrm
