"""CosyVoice2 (FunAudioLLM/CosyVoice2-0.5B) as an edge_runtime family, written here from upstream's
description (no upstream code):

    family      the SpeechModel: recognise/plan/load the official folder, voices, synthesis
    folder      the folder's files, their checks and errors
    llm         the LM (transformers' Qwen2 backbone + speech embedding/decoder), cached decoding
    sampling    RAS sampling (repetition-aware nucleus sampling)
    flow/       tokens -> mel: conformer encoder, causal UNet estimator, CFM solver, incremental stream
    hift        the HiFT vocoder (NSF source, F0 predictor, iSTFT); hift_stream: its streamed form
    tokenizer, features, frontend   text ids; prompt features; ONNX speaker embedding / speech tokens
    pipeline    one request: LM -> flow -> HiFT, whole or streamed; schedule: the streamed token hops
    yaml_config upstream's hyperpyyaml read as data
"""
