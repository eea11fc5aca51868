"""CosyVoice2 (FunAudioLLM/CosyVoice2-0.5B) and CosyVoice3 (Fun-CosyVoice3-0.5B-2512) as one family: an
LM that turns text into 25 Hz speech tokens, a flow that turns tokens into a mel spectrogram conditioned
on the voice prompt, and the HiFT vocoder; front ends (speaker embedding, speech tokenizer) run by
onnxruntime on the CPU. The folder's files say which version it is (folder.detect).

Three sub-models in one plan, each from its own state dict:
  ""     llm.pt   text_embedding (Qwen's 151936-row table: only looked up, the planner may leave it on
                  the CPU), llm (24 Qwen2 layers, one forward per speech token), llm_head
  flow   flow.pt  flow_encoder (v2: the conformer; v3: embedding + pre-lookahead convs) and
                  flow_estimator (v2: the UNet; v3: the 22-block DiT), run per streamed chunk, 10 Euler steps
  hift   hift.pt  the vocoder (v3: its causal variant), always fp32 (source and iSTFT are not
                  half-precision safe)

Voices: zero-shot (prompt audio + transcript), cross-lingual (prompt audio only: the LM gets no prompt,
the flow still clones the timbre) and instruct (OpenAI's `instructions`: the LM reads
"<instructions><|endofprompt|>" in place of the prompt transcript and no prompt tokens). CosyVoice3's
LM also reads a system prompt ending in <|endofprompt|> before any of these, as upstream's examples
write it. What upstream caches per speaker is the PreparedVoice, counted in bytes by the voice cache.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.errors import InvalidInputError
from edge_runtime.models.base import ModelSource, Placer, SpeechModel, SubModel, SynthesisSettings
from edge_runtime.models.cosyvoice import folder as files
from edge_runtime.models.registry import register
from edge_runtime.prepared_voice import PreparedVoice

log = logging.getLogger(__name__)

# What CosyVoice3's LM reads before <|endofprompt|> in every upstream example
SYSTEM_PROMPT = "You are a helpful assistant."
TOKEN_RATE = 25.0  # speech tokens per second of audio
PROMPT_RATE = 16000  # front ends read 16 kHz prompts (the flow's prompt mel is made at 24 kHz from it)


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The module's children in order, ModuleLists expanded: one planner block each."""
    out: list[torch.nn.Module] = []
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList):
            out.extend(child)
        elif any(True for _ in child.parameters()):
            out.append(child)
    return out


def _marks_table(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """CosyVoice2's sos/task table (CosyVoice3 keeps those marks in its speech embedding)."""
    return [lm.llm_embedding] if hasattr(lm, "llm_embedding") else []


def _flow_cache_note(flow_cfg, dtype: torch.dtype) -> str:
    """What a streamed request keeps beyond the plan's peak: the flow's keys/values per Euler step."""
    from edge_runtime.models.cosyvoice.pipeline import FLOW_CACHE_BYTES

    per_frame = flow_cfg.cache_bytes_per_frame(torch.tensor([], dtype=dtype).element_size())
    return (f"a streamed request keeps the flow's keys/values: {per_frame / 2**20:.1f} MiB per mel frame "
            f"(50 frames per second of audio, the voice prompt's included), at most "
            f"{FLOW_CACHE_BYTES / 2**30:.0f} GiB per request; not in the peak above")


class _Parts:
    """The three skeletons of the folder's CosyVoice version, built from its configs (on whatever
    device is current)."""

    def __init__(self, folder: Path, version: files.Version) -> None:
        from edge_runtime.models.cosyvoice.llm import LMConfig
        from edge_runtime.models.cosyvoice.yaml_config import load as load_yaml

        self.version = version
        v3 = self.version is files.V3
        if v3:
            from edge_runtime.models.cosyvoice.dit import DiTFlowConfig as FlowConfig
            from edge_runtime.models.cosyvoice.hift_causal import CausalHiFTConfig as HiFTConfig
        else:
            from edge_runtime.models.cosyvoice.flow import FlowConfig
            from edge_runtime.models.cosyvoice.hift import HiFTConfig
        path = folder / self.version.yaml
        try:
            self.yaml = load_yaml(path)
            self.lm = LMConfig.from_folder(folder, version=3 if v3 else 2)
            self.flow = FlowConfig.from_yaml(path)
            self.hift = HiFTConfig.from_yaml(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"cannot read the {self.version.title} configs in {folder} ({self.version.yaml}, "
                                    f"{files.QWEN_DIR}/config.json): {exc}") from None
        self.sample_rate = int(self.yaml.get("sample_rate", 24000))

    def build_lm(self):
        from edge_runtime.models.cosyvoice.llm import model_class

        return model_class(self.lm)(self.lm)

    def build_flow(self):
        if self.version is files.V3:
            from edge_runtime.models.cosyvoice.dit import CausalFlowDiT

            return CausalFlowDiT(self.flow)
        from edge_runtime.models.cosyvoice.flow import CausalFlow

        return CausalFlow(self.flow)

    def build_hift(self):
        if self.version is files.V3:
            from edge_runtime.models.cosyvoice.hift_causal import CausalHiFTGenerator

            return CausalHiFTGenerator(self.hift)
        from edge_runtime.models.cosyvoice.hift import HiFTGenerator

        return HiFTGenerator(self.hift)


@register
class CosyVoiceModel(SpeechModel):
    family = "cosyvoice"
    supports_voice_prompt = True
    supports_instructions = True
    prompt_sample_rate = PROMPT_RATE

    # -- the family ---------------------------------------------------------------------------
    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return files.is_cosyvoice_folder(folder)

    @classmethod
    def weights_present(cls, folder: Path) -> bool:
        return files.weights_present(folder)

    @classmethod
    def require_weights(cls, folder: Path) -> None:
        files.check_files(folder)

    @classmethod
    def config_files(cls) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for v in files.VERSIONS for name in v.config_files))

    @classmethod
    def layout(cls, source: ModelSource, dtype: torch.dtype, fp32_components: tuple[str, ...] = ()):
        from edge_runtime.policy.planner import SPEECH_CHARS_PER_S, describe_model

        parts = _Parts(source.path, files.check_files(source.path, config_only=True))
        with torch.device("meta"):
            lm, flow, hift = parts.build_lm(), parts.build_flow(), parts.build_hift()
        backbone = lm.llm.model.model
        lm_parts = {"text_embedding": [backbone.embed_tokens], "llm": list(backbone.layers),
                    "llm_head": [backbone.norm, lm.speech_embedding, *_marks_table(lm), lm.llm_decoder]}
        tokens_per_char = TOKEN_RATE / SPEECH_CHARS_PER_S
        main = describe_model(lm, lm_parts, {"llm", "llm_head"}, dtype, fp32_components)
        main = main.with_hints(tokens_per_char=tokens_per_char, prompt_tokens_per_s=TOKEN_RATE,
                               max_positions=int(parts.lm.qwen.get("max_position_embeddings", 32768)))
        estimator = flow.decoder.estimator
        flow_parts = {"flow_encoder": [b for b in _blocks(flow) if b is not flow.decoder],
                      "flow_estimator": estimator.placement_units()}
        flow_layout = describe_model(flow, flow_parts, (), dtype, fp32_components)
        # the flow runs 10 Euler steps on a batch of 2 (classifier-free guidance) per chunk
        flow_layout = flow_layout.replace_component("flow_estimator", passes_per_token=20)
        hift_layout = describe_model(hift, {"hift": _blocks(hift)}, (), dtype, ("hift",))
        hift_layout = hift_layout.replace_component("hift", stays_resident=True, batch_cap=1,
                                                    tokens_per_char=tokens_per_char)
        layout = main.with_submodel("flow", flow_layout).with_submodel("hift", hift_layout)
        return dataclasses.replace(layout, notes=layout.notes + (_flow_cache_note(parts.flow, dtype),))

    @classmethod
    def load(cls, source: ModelSource, placer: Placer) -> CosyVoiceModel:
        folder = source.path
        parts = _Parts(folder, files.check_files(folder))
        builders = {"": parts.build_lm, "flow": parts.build_flow, "hift": parts.build_hift}
        for name, build in builders.items():  # strict keys and shapes, before any weight is read
            with torch.device("meta"):
                expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
            files.check_state_dict(folder / files.CHECKPOINTS[name], expected, parts.version.yaml)
        # the LM decodes token by token: on a CPU its weights may be bf16 (see precision.cpu_decoder_dtype)
        lm_dtype = placer.decoder_dtype or placer.dtype
        lm = placer.place(SubModel("", parts.build_lm, folder / files.CHECKPOINTS[""],
                                   no_split_modules=("Qwen2DecoderLayer",), dtype=lm_dtype))
        flow = placer.place(SubModel("flow", parts.build_flow, folder / files.CHECKPOINTS["flow"]))
        hift = placer.place(SubModel("hift", parts.build_hift, folder / files.CHECKPOINTS["hift"],
                                     dtype=torch.float32))
        lm.set_execution(placer.device, lm_dtype)
        flow.set_execution(placer.device, placer.dtype)
        return cls(source.model_id, folder, parts, lm, flow, hift, placer.device, placer.dtype)

    # -- a loaded model -------------------------------------------------------------------------
    def __init__(self, model_id: str, folder: Path, parts: _Parts, lm, flow, hift,
                 device: torch.device, dtype: torch.dtype) -> None:
        from edge_runtime.models.cosyvoice.frontend import CosyVoiceFrontend
        from edge_runtime.models.cosyvoice.pipeline import Pipeline
        from edge_runtime.models.cosyvoice.tokenizer import CosyVoiceTextTokenizer

        self.model_id, self.folder, self.parts = model_id, folder, parts
        self.sample_rate = parts.sample_rate
        self.lm, self.flow, self.hift = lm, flow, hift
        self.device, self.dtype = device, dtype
        self.version = parts.version
        self.tokenizer = CosyVoiceTextTokenizer(folder / files.QWEN_DIR, version=3 if parts.version is files.V3 else 2)
        if parts.version is files.V3:
            # the LM checks for <|endofprompt|> by id: the folder's tokenizer says which (151646 upstream)
            lm.cfg = dataclasses.replace(lm.cfg, endofprompt_id=self.tokenizer.endofprompt_id)
        self.frontend = CosyVoiceFrontend(folder, parts.yaml, tokenizer=self.tokenizer, version=parts.version)
        self.pipeline = Pipeline(lm, flow, hift, parts, device, dtype)

    def components(self) -> dict[str, Any]:
        return {"llm": self.lm, "flow": self.flow, "hift": self.hift}

    def split_text(self, text: str) -> list[str]:
        from edge_runtime.models.text import normalize_text, split_sentences

        return split_sentences(normalize_text(text))

    def check_settings(self, settings: SynthesisSettings) -> None:
        if settings.speaker is not None:
            raise InvalidInputError(f"{self.model_id} ({self.version.title}) has no built-in speakers; clone a voice "
                                    "from a prompt instead")

    # -- voices ----------------------------------------------------------------------------------
    def prepare_voice(self, audio: np.ndarray, sample_rate: int, transcript: str | None = None) -> PreparedVoice:
        from edge_runtime.models.text import normalize_text

        transcript = normalize_text(transcript) if transcript and transcript.strip() else None
        prompt = self.frontend.prepare_prompt(audio, sample_rate, transcript)
        voice = PreparedVoice(tensors=prompt.tensors(), model_id=self.model_id, sample_rate=sample_rate,
                              transcript=transcript, extra={"mode": prompt.mode.value})
        self.warm_voice(voice)
        return voice

    def warm_voice(self, voice: PreparedVoice) -> None:
        """Run the flow on the voice prompt's own chunks once, now: the streamed requests with this
        voice start from there (the pipeline keeps the last voice's), so their first audio waits only
        for the flow of their own first hop."""
        self.pipeline.request([0], [], [], voice, torch.Generator().manual_seed(0)).warm()

    # -- synthesis ---------------------------------------------------------------------------------
    def lm_prompt(self, voice: PreparedVoice | None, settings: SynthesisSettings) -> tuple[list[int], list[int]]:
        """(prompt text ids, prompt speech tokens) the LM reads before the target text: the voice's
        transcript and tokens (zero-shot), nothing (cross-lingual, no voice), or the instruction."""
        from edge_runtime.models.cosyvoice.frontend import CosyVoicePrompt

        instruction = settings.instructions.strip() if settings.instructions else ""
        if self.version is files.V3:
            # "You are a helpful assistant.[ <instruction>]<|endofprompt|>" first, as upstream's examples
            instruction = f"{SYSTEM_PROMPT} {instruction}".strip()
        instruction_ids = self.frontend.instruction_ids(instruction) if instruction else []
        if voice is None:  # instruct or nothing: neither reads a voice
            return instruction_ids, []
        prompt = CosyVoicePrompt.from_tensors(voice.tensors)
        if self.version is files.V3 and not settings.instructions:
            # zero-shot: the system prompt, then the transcript; cross-lingual: the system prompt alone
            lm = prompt.lm_prompt()
            return instruction_ids + lm.text_ids.tolist(), lm.speech_tokens.tolist()
        lm = prompt.lm_prompt(instruction_ids=instruction_ids)
        return lm.text_ids.tolist(), lm.speech_tokens.tolist()

    def synthesize_unit(self, unit: str, settings: SynthesisSettings, voice: PreparedVoice | None = None,
                        stream: bool = False) -> Iterator[np.ndarray]:
        text_ids = self.tokenizer.encode(unit)
        if not text_ids:
            raise InvalidInputError(f"nothing to speak in {unit!r} after tokenisation")
        prompt_text, prompt_speech = self.lm_prompt(voice, settings)
        generator = torch.Generator()
        if settings.seed is not None:
            generator.manual_seed(int(settings.seed))
        else:
            generator.seed()
        request = self.pipeline.request(text_ids, prompt_text, prompt_speech, voice, generator)
        try:
            if stream:
                for chunk in request.stream():
                    yield chunk
            else:
                yield request.whole(speed=settings.speed)
        finally:
            request.close()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"instructions": True, "modes": ["zero_shot", "cross_lingual", "instruct"]}
