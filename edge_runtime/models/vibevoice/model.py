"""VibeVoiceForConditionalGeneration as this runtime runs it: transformers' model and generate(),
with five changes made where the model is built (no other code of transformers is replaced).

1. No third LM pass. With ``guidance_scale != 1`` GenerationMixin._get_logits_processor adds the
   generic UnbatchedClassifierFreeGuidanceLogitsProcessor: per generated token one more LM forward
   (with its own KV cache) on an "unconditional" context made of the prompt's last token and the
   generated token ids, and the next-token scores become
       g * log p_cond(t) + (1 - g) * log p_uncond(t).
   VibeVoice's own guidance is elsewhere: its negative branch (a second LM pass per diffusion frame,
   fed the same speech embeddings) conditions the diffusion head, and the only token decision is the
   argmax over four allowed tokens (audio bos / diffusion / audio eos / eos). Microsoft's original
   generate() never applied CFG to that decision (its ``cfg_scale`` only guides the diffusion); the
   processor came in with transformers' port reusing ``guidance_scale`` for the diffusion. Dropping
   it removes one of three LM passes per diffusion frame (one of two per other step). The output is
   transformers' own, bit for bit, at every step where the processor does not change the choice. It
   changes it exactly when, for the conditional pick t* and some other allowed token t (z = logits;
   the log-softmax normalisers are the same for every token and cancel),
       (g - 1) * (z_u(t*) - z_u(t))  >  g * (z_c(t*) - z_c(t)),
   i.e. CFG moves away from what the unconditional context also favours: at g = 1.3 when the
   unconditional branch prefers t* over t by more than 4.3x the conditional margin (a speech frame
   whose conditional lead over "audio eos" is thin, say). There we keep the conditional choice, the
   one the weights were trained and published with; that step and everything after it differ from
   transformers' generate(). ``lm_guidance = True`` restores the processor (and the third pass).
2. Execution device: VibeVoice's generate takes devices from parameters (``self.device``, the first
   parameter, is the acoustic encoder's; the diffusion head's and the acoustic tokenizer's own), which
   are on the meta device while a backend keeps those blocks offloaded. They come from
   ``execution_device`` instead; placement hooks move inputs where a block really computes.
3. Mixed precision: blocks kept fp32 (the acoustic encoder, the latent factors, any the profile
   names) get inputs cast to their dtype, and the decoded latent is cast to the decoder's.
4. The two latent factors are buffers (DeepSpeed ZeRO-3 cannot partition 0-dim parameters).
5. Hooks for synthesis: ``noise_scale`` scales the diffusion's starting noise (None: 1, the model's
   N(0, I); 0: no noise, each frame's latent a deterministic function of its condition), and
   ``chunk_sink`` receives each decoded frame's audio as soon as the streaming decoder made it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


# The latent factors are 0-dim parameters, which DeepSpeed ZeRO-3 cannot partition (it views each
# parameter as bytes to broadcast it: "self.dim() cannot be 0"); as persistent buffers they load from
# the same checkpoint names and every backend keeps them whole.
LATENT_FACTORS = ("latent_scaling_factor", "latent_bias_factor")


@functools.cache
def generation_class():
    """The subclass of transformers.VibeVoiceForConditionalGeneration the family builds (one class per
    process; its checkpoint names are transformers' own)."""
    import transformers
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    base = transformers.VibeVoiceForConditionalGeneration

    class VibeVoiceForConditionalGeneration(base):
        # per-model settings (plain attributes: nn.Module keeps them in the instance's __dict__)
        execution_device: torch.device | None = None
        lm_guidance: bool = False  # True: keep transformers' generic CFG logits processor (a 3rd LM pass)
        noise_scale: float | None = None
        chunk_sink: Callable[[torch.Tensor], None] | None = None
        decoder_dtype: torch.dtype | None = None

        def __init__(self, config) -> None:
            super().__init__(config)
            inner = self.model
            for name in LATENT_FACTORS:  # constants at inference: buffers (same checkpoint names)
                inner.register_buffer(name, inner._parameters.pop(name).data)

        @property
        def device(self) -> torch.device:
            return self.execution_device if self.execution_device is not None else super().device

        def _get_logits_processor(self, *args, **kwargs):
            processors = super()._get_logits_processor(*args, **kwargs)
            if self.lm_guidance:
                return processors
            return LogitsProcessorList(p for p in processors
                                       if not isinstance(p, UnbatchedClassifierFreeGuidanceLogitsProcessor))

        def _sample_audio_latent(self, positive_condition, negative_condition, noise_scheduler,
                                 num_diffusion_steps, guidance_scale):
            # transformers 5.24's loop, with the execution device and the noise scale
            condition = torch.cat([positive_condition, negative_condition], dim=0).to(self.device)
            noisy = torch.randn(condition.shape[0], self.config.audio_config.hidden_size).to(condition)
            if self.noise_scale is not None and self.noise_scale != 1.0:
                noisy = noisy * self.noise_scale
            noise_scheduler.set_timesteps(num_inference_steps=num_diffusion_steps)
            half = len(noisy) // 2
            for timestep in noise_scheduler.timesteps:
                combined = torch.cat([noisy[:half], noisy[:half]], dim=0)
                eps = self.model.diffusion_head(combined, timestep.repeat(combined.shape[0]).to(combined),
                                                condition=condition)
                cond_eps, uncond_eps = torch.split(eps, half, dim=0)
                guided = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
                eps = torch.cat([guided, guided], dim=0)
                noisy = noise_scheduler.step(eps, timestep, noisy).prev_sample
            return noisy[:half].unsqueeze(1)

        def _decode_audio_latent(self, audio_latent, diffusion_mask, batch_size, acoustic_cache):
            # transformers 5.24's, with the execution device and the decoder's dtype
            inner = self.model
            scaled = (audio_latent / inner.latent_scaling_factor.to(audio_latent.device)
                      - inner.latent_bias_factor.to(audio_latent.device))
            if not diffusion_mask.all():
                padded = torch.zeros(batch_size, *scaled.shape[1:]).to(scaled.device, scaled.dtype)
                padded[diffusion_mask] = scaled
            else:
                padded = scaled
            padded = padded.to(self.device, self.decoder_dtype or padded.dtype)
            out = inner.audio_tower.decode(padded, padding_cache=acoustic_cache, use_cache=True)
            if self.chunk_sink is not None:
                self.chunk_sink(out.audio)
            return out

    VibeVoiceForConditionalGeneration.__module__ = __name__
    return VibeVoiceForConditionalGeneration


def align_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype], lm_dtype: torch.dtype) -> list:
    """Where the audio-side blocks' dtypes differ (fp32 parts beside half-precision ones), each casts
    its floating inputs to its own dtype, and the connectors hand the LM its dtype. Returns the hook
    handles (none when every block has the LM's dtype)."""
    if all(d == lm_dtype for d in dtypes.values()):
        return []
    handles = []
    for name, dtype in dtypes.items():
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(_cast_inputs(dtype), with_kwargs=True))
        if name.endswith(("multi_modal_projector", "semantic_connector")) and dtype != lm_dtype:
            handles.append(module.register_forward_hook(lambda _m, _a, out: out.to(lm_dtype)))
    return handles


def _cast_inputs(dtype: torch.dtype):
    def cast(value: Any) -> Any:
        if torch.is_tensor(value) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        return value

    def hook(_module, args: Iterable, kwargs: dict):
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    return hook
