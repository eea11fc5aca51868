"""The flow-matching solver (upstream ``CausalConditionalCFM`` at inference).

From noise at t = 0 to mel at t = 1 in ``n_timesteps`` Euler steps on a cosine time schedule. Each
step runs the estimator once on a batch of two: conditioned (encoder mel, speaker, prompt mel) and
unconditioned (those three zeroed), combined as ``(1 + r) v_cond - r v_uncond`` (classifier-free
guidance, r = 0.7). Step sizes follow upstream's accumulation (t += dt; dt = t_next - t) exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edge_runtime.models.cosyvoice.flow.config import FlowConfig
from edge_runtime.models.cosyvoice.flow.estimator import CausalUNetEstimator
from edge_runtime.models.cosyvoice.flow.incremental import LayerState


@dataclass(frozen=True)
class SolverPlan:
    """What every call with the same weights, dtype and device shares: step sizes and time biases."""

    dt: torch.Tensor  # [S] Euler step sizes
    time_biases: list[list[torch.Tensor]]  # [step][estimator layer] -> [1, C] (the UNet: per resnet block)


class CausalCFM(nn.Module):
    """The solver around an estimator: CosyVoice2's UNet by default; CosyVoice3 passes its DiT.

    The estimator is called as ``estimator(x, time_biases, mask, state)`` with ``x`` [B, T, C] the
    noisy mel followed by the conditions in ``condition_order`` (channels last), and provides
    ``time_biases(t [S])`` -> per step, what it needs of the flow time (computed once per plan)."""

    CONDITIONS = ("mu", "speaker", "prompt")

    def __init__(self, cfg: FlowConfig, estimator: nn.Module | None = None,
                 condition_order: tuple[str, ...] = CONDITIONS, solver_dtype: torch.dtype | None = None) -> None:
        """``solver_dtype``: the dtype of the flow times, step sizes, noise and Euler state (None: the
        model's, as upstream does). fp32 under half weights keeps the state's rounding from piling up
        over the steps (the estimator still runs in the model's dtype); its estimator must then
        accept fp32 flow times in ``time_biases``."""
        super().__init__()
        if sorted(condition_order) != sorted(self.CONDITIONS):
            raise ValueError(f"condition_order {condition_order!r} must order {self.CONDITIONS!r}")
        self.cfg = cfg
        self.estimator = estimator if estimator is not None else CausalUNetEstimator(cfg)
        self.condition_order = tuple(condition_order)
        self.solver_dtype = solver_dtype

    def plan(self, dtype: torch.dtype, device: torch.device) -> SolverPlan:
        steps = self.cfg.n_timesteps
        span = torch.linspace(0, 1, steps + 1, device=device, dtype=self.solver_dtype or dtype)
        if self.cfg.t_scheduler == "cosine":
            span = 1 - torch.cos(span * 0.5 * torch.pi)
        t, dt = span[0], span[1] - span[0]
        times, sizes = [], []
        for step in range(1, steps + 1):
            times.append(t)
            sizes.append(dt)
            t = t + dt
            if step < steps:
                dt = span[step + 1] - t
        return SolverPlan(torch.stack(sizes), self.estimator.time_biases(torch.stack(times)))

    def solve(self, noise: torch.Tensor, mu: torch.Tensor, speaker: torch.Tensor, prompt: torch.Tensor, *,
              plan: SolverPlan, mask: torch.Tensor | None,
              states: list[LayerState] | None = None) -> torch.Tensor:
        """noise, mu, prompt [1, 80, T]; speaker [1, 80] -> mel [1, 80, T] (in ``solver_dtype``).

        ``mask`` [T, keys] for chunk-causal attention (None: full); ``states`` one per step when the T
        frames continue frames computed before (their keys/values and conv context)."""
        frames = noise.shape[2]
        # the estimator works channels last: [B, T, C]
        conditions = {"mu": mu, "speaker": speaker[:, :, None].expand(-1, -1, frames), "prompt": prompt}
        given = torch.cat([conditions[name] for name in self.condition_order], dim=1).transpose(1, 2)
        given = torch.cat([given, torch.zeros_like(given)])  # the unconditioned branch sees zeros
        rate = self.cfg.cfg_rate
        x = noise.transpose(1, 2).to(self.solver_dtype or noise.dtype)
        for step, biases in enumerate(plan.time_biases):
            v = self.estimator(torch.cat([x.to(given.dtype).expand(2, -1, -1), given], dim=2), biases, mask,
                               None if states is None else states[step]).to(x.dtype)
            x = x + plan.dt[step] * ((1.0 + rate) * v[:1] - rate * v[1:])
        return x.transpose(1, 2)
