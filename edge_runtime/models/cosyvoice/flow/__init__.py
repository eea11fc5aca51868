"""CosyVoice2's flow: speech tokens -> 80-bin mel (conformer encoder, causal UNet estimator, CFM solver).

    FlowConfig    the yaml's ``flow`` numbers (defaults: CosyVoice2-0.5B)
    CausalFlow    the module (``flow.pt`` loads strictly); ``inference`` = upstream's ``flow.inference``
    FlowStream    one streamed request, computing each chunk's frames once
    build, load   construct (e.g. on the meta device) / construct and load a folder's ``flow.pt``
"""

from edge_runtime.models.cosyvoice.flow.config import FlowConfig
from edge_runtime.models.cosyvoice.flow.model import CausalFlow, build, load
from edge_runtime.models.cosyvoice.flow.stream import FlowStream

__all__ = ["CausalFlow", "FlowConfig", "FlowStream", "build", "load"]
