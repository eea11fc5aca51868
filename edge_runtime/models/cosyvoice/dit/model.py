"""CosyVoice3's flow (upstream ``CausalMaskedDiffWithDiT``): speech tokens -> 80-bin mel, 2 frames per token.

No conformer encoder: each token's 80-wide embedding goes through the pre-lookahead convs (each
token also reads the next 3; 80 -> 1024 -> 80 channels) and is repeated per mel frame; that is the
mu the DiT estimator is conditioned on. Everything else (prompt first, the solver, the prompt mel
as the condition of the first frames, streaming) is CosyVoice2's, inherited from
:class:`~edge_runtime.models.cosyvoice.flow.model.TokenFlow`, so ``inference`` has the same contract
and :class:`~edge_runtime.models.cosyvoice.flow.FlowStream` streams it chunk by chunk.
Parameter names and shapes equal upstream's, so ``flow.pt`` loads with ``strict=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edge_runtime.models.cosyvoice.dit.config import DiTFlowConfig
from edge_runtime.models.cosyvoice.dit.estimator import DiTEstimator
from edge_runtime.models.cosyvoice.flow.cfm import CausalCFM
from edge_runtime.models.cosyvoice.flow.encoder import PreLookahead
from edge_runtime.models.cosyvoice.flow.incremental import LayerState
from edge_runtime.models.cosyvoice.flow.model import TokenFlow

# the DiT's input projection reads [noisy mel, prompt mel, mu, speaker] in this order
DIT_CONDITIONS = ("prompt", "mu", "speaker")


class CausalFlowDiT(TokenFlow):
    def __init__(self, cfg: DiTFlowConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DiTFlowConfig()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.mel_bins)
        self.pre_lookahead_layer = PreLookahead(cfg.input_size, cfg.pre_lookahead_len, cfg.lookahead_channels)
        # the solver stays fp32 under half weights: flow times (1000 t in bf16 is off by up to ~2
        # radians in the time embedding) and the Euler state (bf16 rounding of x, added up over 10
        # steps, was ~4x the rest of the mel's error; scripts/cosyvoice3_dtype.py)
        self.decoder = CausalCFM(cfg, DiTEstimator(cfg), condition_order=DIT_CONDITIONS,
                                 solver_dtype=torch.float32)

    def encode(self, tokens: torch.Tensor, ahead: torch.Tensor, *, chunked: bool, start: int = 0,
               state: LayerState | None = None) -> torch.Tensor:
        """Tokens [1, N] (+ up to 3 look-ahead tokens [1, L]; zeros stand in for missing ones) -> mu
        [1, 80, 2N]. Nothing here attends, so ``chunked`` changes nothing; ``state`` keeps the causal
        conv's context for the tokens after ``start``."""
        if state is None and start:
            raise ValueError("start > 0 needs the state of the positions before it")
        h = self.pre_lookahead_layer(self.input_embedding(tokens), self.input_embedding(ahead), state)
        return h.repeat_interleave(self.cfg.token_mel_ratio, dim=1).transpose(1, 2)


def build(cfg: DiTFlowConfig | None = None, device: torch.device | str | None = None) -> CausalFlowDiT:
    """Construct (on ``device``, e.g. ``"meta"`` for sizing) without loading weights."""
    with torch.device(device or "cpu"):
        return CausalFlowDiT(cfg)


def load(model_dir: str | Path, device: torch.device | str = "cpu") -> CausalFlowDiT:
    """The flow of a CosyVoice3 folder: ``cosyvoice3.yaml`` numbers + ``flow.pt`` loaded strictly."""
    model_dir = Path(model_dir)
    model = build(DiTFlowConfig.from_yaml(model_dir / "cosyvoice3.yaml"))
    state = torch.load(model_dir / "flow.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
