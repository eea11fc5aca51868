"""VibeVoice's prompt, built from a cached voice instead of raw audio.

transformers' VibeVoiceProcessor renders the chat template (system prompt, " Voice input:" with one
audio placeholder per speaker, " Text input:", the speaker's text, " Speech output:" and the audio
bos token), expands each placeholder to one token per acoustic latent (ceil(samples / 3200)), and
generate() then runs the acoustic encoder on the raw waveform and scatters the projected latents
over the placeholders. Here the encoder ran once, in prepare_voice (``sample=False``: the latents
are deterministic), and every sentence's prompt is the same token sequence with the cached latents
scattered by the same ops: generate(input_ids=..., inputs_embeds=...) then produces exactly what
generate(input_ids=..., input_values=...) does (tests/test_vibevoice_family.py checks it bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_runtime.errors import InvalidInputError

SPEAKER = "0"  # the single speaker of every request (the template's role name)


@dataclass(frozen=True)
class Prompt:
    input_ids: torch.Tensor  # (rows, tokens), left-padded
    attention_mask: torch.Tensor  # (rows, tokens)
    inputs_embeds: torch.Tensor  # (rows, tokens, hidden): token embeddings, latents at the placeholders

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def control_tokens(processor) -> tuple[str, ...]:
    return (processor.audio_bos_token, processor.audio_eos_token, processor.audio_token)


def prompt_text(processor, text: str, voice_frames: int | None) -> str:
    """The chat template's prompt for one sentence, the voice's placeholders expanded as the
    processor expands them (one audio token per latent frame)."""
    for token in control_tokens(processor):
        if token in text:
            raise InvalidInputError(f"the text contains VibeVoice's control token {token!r}; remove it")
    content = [{"type": "text", "text": text}]
    if voice_frames is not None:
        content.append({"type": "audio", "audio": None})  # the template only looks at the item's type
    rendered = processor.apply_chat_template([{"role": SPEAKER, "content": content}], tokenize=False)
    if voice_frames is None:
        return rendered
    token = processor.audio_token
    if rendered.count(token) != 1:
        raise InvalidInputError(f"VibeVoice's chat template gave {rendered.count(token)} audio placeholders for one "
                                "voice; expected 1 (is the processor's chat_template the published one?)")
    return rendered.replace(token, token * voice_frames)


def token_ids(processor, texts: list[str], voice_frames: int | None) -> list[list[int]]:
    return [processor.tokenizer(prompt_text(processor, t, voice_frames))["input_ids"] for t in texts]


def voice_embeddings(model, latents: torch.Tensor) -> torch.Tensor:
    """(frames, hidden) LM inputs of a voice's cached encoder latents, as
    VibeVoiceModel.get_audio_features computes them: (latents + bias) * scale, then the projector."""
    inner = model.model
    device = model.device
    features = (latents.to(device) + inner.latent_bias_factor.to(device)) * inner.latent_scaling_factor.to(device)
    projector = inner.multi_modal_projector
    dtype = next(p.dtype for p in projector.parameters() if p.is_floating_point())
    return projector(features.to(dtype))


def build(model, processor, texts: list[str], voice_latents: torch.Tensor | None) -> Prompt:
    """Rows of prompts (one per text, left-padded to the longest), embedded, with the voice's
    projected latents at each row's audio placeholders."""
    frames = None if voice_latents is None else int(voice_latents.shape[0])
    rows = token_ids(processor, texts, frames)
    longest = max(len(r) for r in rows)
    pad = processor.tokenizer.pad_token_id
    device = model.device
    ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=device)
    embeds = model.get_input_embeddings()(ids)
    if voice_latents is not None:
        audio = voice_embeddings(model, voice_latents.unsqueeze(0))[0].repeat(len(rows), 1)
        placeholder = (ids == model.config.audio_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(placeholder, audio.to(embeds.device, embeds.dtype))
    return Prompt(ids, mask, embeds)
