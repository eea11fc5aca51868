"""The Higgs Audio V2 family (Boson AI): family.py registers it; layout.py, codec.py and prompt.py
hold what the planner sees, the audio tokenizer without torchaudio, and the prompt inputs."""

from edge_runtime.models.higgs_audio_v2.family import HiggsAudioV2SpeechModel

__all__ = ["HiggsAudioV2SpeechModel"]
