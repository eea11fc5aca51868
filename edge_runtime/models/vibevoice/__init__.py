"""Microsoft VibeVoice on transformers: layout.py (what runs per frame, what once), model.py (our
generate() changes: no third LM pass, offload-safe devices, mixed precision, streaming hook),
prompt.py (prompts from a cached voice), scheduler.py (diffusion settings), stepwise.py (streamed
generate) and family.py (the SpeechModel registered as ``vibevoice``)."""
