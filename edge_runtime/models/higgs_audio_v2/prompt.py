"""The inputs HiggsAudioV2Processor.apply_chat_template builds, built from cached prompt codes.

The published chat template writes a conversation as Llama 3 turns: a system turn (the instruction,
then the scene description between <|scene_desc_start|> / <|scene_desc_end|>), user turns with text,
assistant turns with audio as <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>, and the generation prompt
opening an assistant audio stream. Zero-shot cloning is the conversation boson's examples use:
[system + scene, user: the prompt's transcript, assistant: the prompt's audio, user: the sentence].

The processor then runs the audio tokenizer on the prompt audio (every call), wraps its codes in a
stream-bos and a stream-eos frame, delays codebook k by k frames, and expands <|AUDIO_OUT|> to one
token per delayed frame (the last num_codebooks - 1 of them the delay token). Here the delayed codes
are computed once per voice (family.prepare_voice) and only the text is tokenized per sentence; the
result is token for token what the processor gives (tests/test_higgs_family.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SYSTEM = "Generate audio following instruction."  # boson's system prompt for generation
SCENE = "Audio is recorded from a quiet room."  # boson's default scene description
HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
EOT = "<|eot_id|>"


@dataclass(frozen=True)
class Prompt:
    """One row's LM inputs: text ids (audio placeholders included) and the prompt's delayed codes."""

    input_ids: list[int]
    audio_input_ids: torch.Tensor | None  # (frames, codebooks) delayed codes with stream bos/eos; None: no voice


def delayed_codes(processor, codes: torch.Tensor) -> torch.Tensor:
    """(codebooks, frames) codec codes -> (frames + 1 + codebooks, codebooks): a stream-bos frame before,
    a stream-eos frame after, codebook k delayed by k frames (the processor's own build_delay_pattern)."""
    bos = codes.new_full((codes.shape[0], 1), processor.audio_stream_bos_id)
    eos = codes.new_full((codes.shape[0], 1), processor.audio_stream_eos_id)
    framed = torch.cat([bos, codes, eos], dim=1)[None]
    return processor.build_delay_pattern(framed)[0].T.contiguous()


def conversation_text(processor, unit: str, scene: str | None, voice_frames: int | None,
                      transcript: str | None) -> str:
    """The chat template's text for the sentence (and the voice prompt's turns when ``voice_frames``,
    the number of delayed prompt frames, is given), placeholders already expanded."""
    parts = [processor.tokenizer.bos_token or "", HEADER.format(role="system"), SYSTEM]
    if scene:
        parts += ["\n\n<|scene_desc_start|>\n", scene.strip(), "\n<|scene_desc_end|>"]
    parts.append(EOT)
    if voice_frames is not None:
        parts += [HEADER.format(role="user"), (transcript or "").strip(), EOT, HEADER.format(role="assistant"),
                  processor.audio_bos_token, processor.get_audio_tokens(voice_frames), processor.audio_eos_token, EOT]
    parts += [HEADER.format(role="user"), unit.strip(), EOT, HEADER.format(role="assistant"), processor.audio_bos_token]
    return "".join(parts)


def build_prompt(processor, unit: str, scene: str | None, voice_codes: torch.Tensor | None,
                 transcript: str | None) -> Prompt:
    frames = None if voice_codes is None else int(voice_codes.shape[0])
    text = conversation_text(processor, unit, scene, frames, transcript)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return Prompt(input_ids=list(ids), audio_input_ids=voice_codes)


def batch_inputs(prompts: list[Prompt], pad_id: int, device) -> dict:
    """generate() keyword arguments for rows sharing one voice: text left-padded (the processor's
    padding side), the voice's delayed codes repeated per row (same length: no audio padding)."""
    longest = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        ids[row, longest - n:] = torch.tensor(prompt.input_ids)
        mask[row, longest - n:] = 1
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    codes = prompts[0].audio_input_ids
    if codes is not None:
        audio = torch.as_tensor(codes, dtype=torch.long)[None].repeat(len(prompts), 1, 1)
        inputs["audio_input_ids"] = audio.to(device)
        inputs["audio_input_ids_mask"] = torch.ones(audio.shape[:2], dtype=torch.bool, device=device)
    return inputs
