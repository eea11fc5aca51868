"""CosyVoice3's flow: speech tokens -> 80-bin mel (pre-lookahead convs, DiT estimator, CFM solver).

    DiTFlowConfig  the yaml's ``flow`` numbers (defaults: Fun-CosyVoice3-0.5B-2512)
    CausalFlowDiT  the module (``flow.pt`` loads strictly); ``inference`` = upstream's ``flow.inference``
    FlowStream     one streamed request, computing each chunk's frames once (CosyVoice2's class:
                   the DiT flow has the same interface and chunk-causal structure)
    build, load    construct (e.g. on the meta device) / construct and load a folder's ``flow.pt``
"""

from edge_runtime.models.cosyvoice.dit.config import DiTFlowConfig
from edge_runtime.models.cosyvoice.dit.model import CausalFlowDiT, build, load
from edge_runtime.models.cosyvoice.flow.stream import FlowStream

__all__ = ["CausalFlowDiT", "DiTFlowConfig", "FlowStream", "build", "load"]
