"""Higgs Audio V2's audio tokenizer (HiggsAudioV2TokenizerModel, 25 frames/s, 8 codebooks) without
torchaudio, and its layout.

transformers' modeling_higgs_audio_v2_tokenizer imports torchaudio at module level and uses it for one
call: ``torchaudio.functional.resample(wave, 24000, 16000)`` before HuBERT. torchaudio is not a
dependency of ours (PyPI's wheels are built for one torch version each, and a mismatched C extension
breaks imports elsewhere), and its lazy ``__init__`` hands out a placeholder class that raises when
torchaudio is missing. So the modeling module is imported directly, with a stand-in module object
under the name ``torchaudio`` in ``sys.modules`` for the duration of that import only: the modeling
module keeps a reference to the stand-in (its one global use of the name), and nothing else in the
process ever sees a fake torchaudio (``find_spec("torchaudio")`` stays None, so transformers' own
backend checks answer as before). The stand-in's ``functional.resample`` is ``edge_runtime.dsp.resample``
(scipy's polyphase filter, what every prompt of ours is resampled with) applied row by row. It is
not torchaudio's windowed-sinc filter: samples differ by filter ripple, which can move a code near a
Voronoi boundary, never the length (both give ceil(n * 16000 / 24000) samples).

The ``requires(backends=("torchaudio",))`` decorator on the classes only records metadata for the
lazy importer; nothing checks it when a model is built, so the real classes work once imported.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
import types

import numpy as np
import torch

TOKENIZER_MODULE = "transformers.models.higgs_audio_v2_tokenizer.modeling_higgs_audio_v2_tokenizer"
DEPENDENCIES = ("transformers.modeling_utils", "transformers.audio_utils", "transformers.processing_utils",
                "transformers.models.auto.modeling_auto", "transformers.models.dac.modeling_dac",
                "transformers.models.hubert.modeling_hubert",
                "transformers.models.higgs_audio_v2_tokenizer.configuration_higgs_audio_v2_tokenizer")
_import_lock = threading.Lock()


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int, **_ignored) -> torch.Tensor:
    """torchaudio.functional.resample's signature, computed with edge_runtime.dsp.resample over the
    last axis (each row on its own), returned on the input's device and dtype."""
    from edge_runtime.dsp import resample as resample_rows

    orig_freq, new_freq = int(orig_freq), int(new_freq)
    if orig_freq == new_freq:
        return waveform
    rows = waveform.detach().to("cpu", torch.float32).reshape(-1, waveform.shape[-1]).numpy()
    out = np.stack([resample_rows(row, orig_freq, new_freq) for row in rows])
    return torch.from_numpy(out).reshape(*waveform.shape[:-1], out.shape[-1]).to(waveform.device, waveform.dtype)


def torchaudio_stand_in() -> types.ModuleType:
    """The module object the tokenizer's ``import torchaudio`` binds: only ``functional.resample``."""
    module = types.ModuleType("torchaudio", "edge_runtime's stand-in: functional.resample via scipy")
    module.functional = types.SimpleNamespace(resample=resample)
    return module


@functools.cache
def tokenizer_module() -> types.ModuleType:
    """transformers' modeling_higgs_audio_v2_tokenizer, imported with the stand-in (see above). An
    import that already happened (a real torchaudio installed and used elsewhere) is taken as is."""
    with _import_lock:
        loaded = sys.modules.get(TOKENIZER_MODULE)
        if loaded is not None:
            return loaded
        # everything the module imports besides torchaudio is imported first, outside the window, and
        # transformers' (cached) torchaudio check is answered before it: False, as it is
        from transformers.utils import import_utils

        import_utils.is_torchaudio_available()
        for dependency in DEPENDENCIES:
            importlib.import_module(dependency)
        saved = sys.modules.get("torchaudio")
        sys.modules["torchaudio"] = torchaudio_stand_in()
        try:
            module = importlib.import_module(TOKENIZER_MODULE)
        finally:
            if saved is None:
                sys.modules.pop("torchaudio", None)
            else:
                sys.modules["torchaudio"] = saved
        return module


def tokenizer_class():
    """HiggsAudioV2TokenizerModel (the real class, not transformers' placeholder)."""
    return tokenizer_module().HiggsAudioV2TokenizerModel


def build_processor(feature_extractor, tokenizer, codec, **options):
    """HiggsAudioV2Processor holding ``codec``. ProcessorMixin checks an audio tokenizer's class against
    the names transformers exports, where HiggsAudioV2TokenizerModel is the placeholder of a missing
    torchaudio: the processor is built without one and given ``codec`` afterwards (the attribute the
    processor's __call__, decode and save_pretrained read)."""
    from transformers import HiggsAudioV2Processor

    processor = HiggsAudioV2Processor(feature_extractor, tokenizer, None, **options)
    processor.audio_tokenizer = codec
    return processor


# -- the codec as a sub-model of the family ------------------------------------------------------------
SUBFOLDER = "audio_tokenizer"  # where our folders keep it (HiggsAudioV2TokenizerModel.save_pretrained)
# Methods placement hooks (which wrap forward) must see: the residual quantizer has no forward at all.
QUANTIZER_METHODS = ("encode", "decode")


def read_config(folder):
    from transformers import HiggsAudioV2TokenizerConfig

    from edge_runtime.errors import ModelNotFoundError

    try:
        return HiggsAudioV2TokenizerConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a missing or foreign codec config
        raise ModelNotFoundError(f"cannot read Higgs Audio's audio tokenizer config in {folder}: {exc}") from None


def build(config):
    """The codec skeleton as our backends place it: its quantizer's encode/decode run through forward,
    so the quantizer can be a streamed block like the rest (the top-level encode/decode only chain
    modules that are blocks)."""
    from edge_runtime.models.hf.csm import route_through_forward

    codec = tokenizer_class()(config)
    route_through_forward(codec.quantizer, QUANTIZER_METHODS)
    return codec


def encoder_blocks(codec) -> list:
    """What runs once per voice prompt, in execution order: HuBERT (layer by layer: its conv front end
    alone, the transformer layers one by one), the semantic and acoustic encoders, the fusing linear."""
    hubert = codec.semantic_model
    enc = hubert.encoder
    return [hubert.feature_extractor, hubert.feature_projection, enc.pos_conv_embed, enc.layer_norm, *enc.layers,
            codec.encoder_semantic, codec.acoustic_encoder, codec.fc]


def decoder_blocks(codec) -> list:
    """What runs once per sentence: codes -> quantized latents -> DAC decoder -> samples."""
    return [codec.quantizer, codec.fc2, codec.acoustic_decoder]


def layout(config, dtype: torch.dtype):
    """The audio tokenizer in fp32 (codecs are fragile in half precision): an encoder component run once
    per voice prompt and a decoder run once per sentence on the generated frames only (the prompt's
    frames are never decoded), one row at a time. The residual quantizer serves both (encode for the
    prompt, decode for the output) and is listed with the decoder, which runs on every request.
    Parts no inference path runs (the semantic decoder and its projection, used in training) land in
    ``other``. Activations: ~3 copies of the widest stage per frame: the DAC decoder's last stage
    (hop samples x its last channel count), the encoder's first (hop x encoder channels) or HuBERT's
    conv front end (its samples per frame / 5 x its first conv's channels)."""
    from edge_runtime.policy.planner import (CODEC_ACTIVATION_COPIES, SPEECH_CHARS_PER_S, build_on_meta,
                                             describe_model)

    codec = build_on_meta(config, tokenizer_class())
    components = {"codec_encoder": encoder_blocks(codec), "codec_decoder": decoder_blocks(codec)}
    described = describe_model(codec, components, (), dtype, ("codec_encoder", "codec_decoder", "other"))
    acoustic, semantic = config.acoustic_model_config, config.semantic_model_config
    hop = int(config.hop_length)
    last_channels = int(acoustic.decoder_hidden_size) // 2 ** len(acoustic.upsampling_ratios)
    semantic_samples = hop * int(config.semantic_sample_rate) // int(config.sample_rate)
    encoder_width = max(hop * int(acoustic.encoder_hidden_size),
                        semantic_samples // int(semantic.conv_stride[0]) * int(semantic.conv_dim[0]))
    frames_per_char = float(config.frame_rate) / SPEECH_CHARS_PER_S
    described = described.replace_component("codec_encoder", activation_width=CODEC_ACTIVATION_COPIES * encoder_width)
    return described.replace_component("codec_decoder", batch_cap=1, tokens_per_char=frames_per_char,
                                       activation_width=CODEC_ACTIVATION_COPIES * hop * max(1, last_channels))
