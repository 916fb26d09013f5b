"""grove-kernels: fused Grove MoE (experts + adjugate experts) ops for PyTorch.

    y = fused_grove_experts(x [T, H], w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia],
                            topk_weights [T, k], topk_ids [T, k])
plus grove_topk / grove_moe, the vLLM drop-ins fused_experts / fused_moe / fused_topk, the
backend switch, and the GroveMoE module. docs/design.md §2 is the contract.
"""
from .settings import set_value_checks, value_checks_enabled
from .api import (fused_experts, fused_grove_experts, fused_moe, fused_topk, grove_moe,
                  grove_topk)
from .backends import available_backends, get_backend, set_backend, use_backend
from .layer import GroveMoE

__version__ = "0.1.0"
__all__ = [
    "grove_topk", "fused_grove_experts", "grove_moe", "fused_experts", "fused_moe", "fused_topk",
    "available_backends", "set_backend", "get_backend", "use_backend", "set_value_checks",
    "value_checks_enabled", "GroveMoE",
]
