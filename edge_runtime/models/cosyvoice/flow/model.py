"""CosyVoice2's flow (upstream ``CausalMaskedDiffWithXvec``): speech tokens -> 80-bin mel, 2 frames per token.

The voice prompt's tokens go first: the encoder reads [prompt tokens, tokens], the solver is given
the prompt's mel as the condition of its first frames, and only the frames after the prompt are
returned. Parameter names and shapes equal upstream's, so ``flow.pt`` loads with ``strict=True``.
:class:`TokenFlow` holds what CosyVoice3's DiT flow (``cosyvoice.dit``) shares with this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice.flow import inputs
from edge_runtime.models.cosyvoice.flow.cfm import CausalCFM
from edge_runtime.models.cosyvoice.flow.config import FlowConfig
from edge_runtime.models.cosyvoice.flow.encoder import UpsampleConformerEncoder
from edge_runtime.models.cosyvoice.flow.incremental import LayerState, chunk_mask


def prompt_condition(prompt: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Frames ``start..end`` of the solver's condition: the prompt mel [1, 80, F], then zeros."""
    cond = prompt.new_zeros(1, prompt.shape[1], end - start)
    if start < prompt.shape[2]:
        stop = min(end, prompt.shape[2])
        cond[:, :, :stop - start] = prompt[:, :, start:stop]
    return cond


class TokenFlow(nn.Module):
    """What CosyVoice2's and CosyVoice3's flows share: placement, the speaker condition and
    ``inference``. A subclass sets ``cfg``, ``input_embedding``, ``spk_embed_affine_layer`` and
    ``decoder`` (a :class:`CausalCFM`) and defines :meth:`encode`."""

    cfg: Any
    input_embedding: nn.Embedding
    spk_embed_affine_layer: nn.Linear
    decoder: CausalCFM

    # Offloading backends may leave weights on the meta device (streamed from disk) or partitioned
    # (ZeRO-3) until their module's forward runs, so where inputs go is the execution device the
    # runtime sets, not a weight's device.
    execution: tuple[torch.device, torch.dtype] | None = None

    def set_execution(self, device: torch.device | str, dtype: torch.dtype) -> None:
        self.execution = (torch.device(device), dtype)

    @property
    def placement(self) -> tuple[torch.device, torch.dtype]:
        if self.execution is not None:
            return self.execution
        w = self.input_embedding.weight
        return w.device, w.dtype

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """Speaker embedding [1, 192] -> the solver's speaker condition [1, 80] (L2-normalised first)."""
        return self.spk_embed_affine_layer(F.normalize(embedding.float(), dim=1).to(self.placement[1]))

    def encode(self, tokens: torch.Tensor, ahead: torch.Tensor, *, chunked: bool, start: int = 0,
               state: LayerState | None = None) -> torch.Tensor:
        """Tokens [1, N] (+ up to 3 look-ahead tokens [1, L]) at positions ``start..start+N`` -> the
        mel mu [1, 80, 2N] the solver is conditioned on; ``chunked``: streaming (chunk-causal);
        ``state``: what the positions before ``start`` left (incremental streaming)."""
        raise NotImplementedError

    @torch.inference_mode()
    def inference(self, tokens: Any, prompt_tokens: Any, prompt_feat: Any, embedding: Any, *,
                  noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  streaming: bool = False, finalize: bool = True) -> torch.Tensor:
        """Mel [1, 80, 2 * len(tokens)] (fp32) of ``tokens`` spoken in the prompt's voice.

        tokens, prompt_tokens: speech token ids ([N] or [1, N]); prompt_feat: the prompt's mel
        [2 * len(prompt_tokens), 80] (or [1, ...]); embedding: speaker embedding [192] or [1, 192].
        noise: [1, 80, >= frames] with frames = 2 * (prompt + tokens), sliced from frame 0 as upstream
        slices its fixed buffer; else drawn from ``generator`` (upstream's buffer when neither is given).
        streaming: chunk-causal attention (25 tokens / 50 frames), as upstream's streaming calls;
        finalize=False: the last 3 tokens are only look-ahead (their frames are not produced)."""
        cfg = self.cfg
        device, dtype = self.placement
        prompt = inputs.token_ids("prompt_tokens", prompt_tokens, cfg.vocab_size, device)
        target = inputs.token_ids("tokens", tokens, cfg.vocab_size, device)
        feat = inputs.prompt_mel(prompt_feat, prompt.shape[1], cfg.token_mel_ratio, cfg.mel_bins, dtype, device)
        speaker = self.speaker(inputs.speaker_embedding(embedding, cfg.spk_embed_dim, torch.float32, device))
        look = 0 if finalize else cfg.pre_lookahead_len
        if target.shape[1] < look:
            raise InvalidInputError(f"tokens: {target.shape[1]} tokens; finalize=False needs at least {look} "
                                    "(the last ones are only look-ahead)")
        seq = torch.cat([prompt, target], dim=1)
        body = seq.shape[1] - look
        buffer = inputs.noise_buffer(noise, generator, cfg.mel_bins, self.decoder.solver_dtype or dtype, device,
                                     body * cfg.token_mel_ratio)
        mu = self.encode(seq[:, :body], seq[:, body:], chunked=streaming)
        frames = mu.shape[2]
        mask = chunk_mask(0, frames, frames, cfg.chunk_frames, device) if streaming else None
        mel = self.decoder.solve(inputs.noise_frames(buffer, 0, frames), mu, speaker,
                                 prompt_condition(feat, 0, frames), plan=self.decoder.plan(dtype, device),
                                 mask=mask)
        return mel[:, :, feat.shape[2]:].float()


class CausalFlow(TokenFlow):
    def __init__(self, cfg: FlowConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or FlowConfig()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.mel_bins)
        self.encoder = UpsampleConformerEncoder(cfg)
        self.encoder_proj = nn.Linear(cfg.encoder_size, cfg.mel_bins)
        self.decoder = CausalCFM(cfg)

    def encode(self, tokens: torch.Tensor, ahead: torch.Tensor, *, chunked: bool, start: int = 0,
               state: LayerState | None = None) -> torch.Tensor:
        """Tokens [1, N] (+ up to 3 look-ahead tokens [1, L]) -> the encoder's mel mu [1, 80, 2N];
        see :meth:`UpsampleConformerEncoder.forward` for ``chunked``, ``start`` and ``state``."""
        h = self.encoder(self.input_embedding(tokens), self.input_embedding(ahead), chunked=chunked,
                         start=start, state=state)
        return self.encoder_proj(h).transpose(1, 2)


def build(cfg: FlowConfig | None = None, device: torch.device | str | None = None) -> CausalFlow:
    """Construct (on ``device``, e.g. ``"meta"`` for sizing) without loading weights."""
    with torch.device(device or "cpu"):
        return CausalFlow(cfg)


def load(model_dir: str | Path, device: torch.device | str = "cpu") -> CausalFlow:
    """The flow of a CosyVoice2 folder: ``cosyvoice2.yaml`` numbers + ``flow.pt`` loaded strictly."""
    model_dir = Path(model_dir)
    model = build(FlowConfig.from_yaml(model_dir / "cosyvoice2.yaml"))
    state = torch.load(model_dir / "flow.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
