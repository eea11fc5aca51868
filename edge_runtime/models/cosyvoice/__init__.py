"""CosyVoice2 (FunAudioLLM) components written for edge_runtime.

Not registered as a family yet: for now this package holds the HiFT vocoder
(:mod:`.hift`) and a tag-ignoring reader of upstream's hyperpyyaml files (:mod:`.yaml_config`).
"""
