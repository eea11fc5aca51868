"""edge_runtime: fit text-to-speech models onto the hardware people have.

    import edge_runtime
    rt = edge_runtime.load()                 # embedded Piper voice, profile chosen from the hardware
    audio, rate = rt.synthesize("Hello there.")
    for chunk in rt.stream("A long text..."):  # audio per chunk, first sentence first
        ...
"""

__version__ = "0.1.0"
__all__ = ["__version__", "load", "Runtime"]


def __getattr__(name: str):
    # Lazy: `import edge_runtime` (and the CLI's --help) must not pay for importing torch.
    if name == "load":
        from edge_runtime.runtime.loader import load

        return load
    if name == "Runtime":
        from edge_runtime.runtime.engine import Runtime

        return Runtime
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
