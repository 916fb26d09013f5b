"""grove_kernels for Hugging Face transformers (>= 5): `pip install grove-kernels[transformers]`.

Importing this module registers, in transformers:
  * the experts implementation "grove_kernels" (ExpertsInterface): every model whose experts
    module uses the experts interface with SwiGLU experts in the [gate; up] layout runs them on
    grove_kernels.fused_experts, forward and backward:
        AutoModelForCausalLM.from_pretrained(path, experts_implementation="grove_kernels")
  * GroveMoE (model_type "grove_moe"): GroveMoeConfig, GroveMoeForCausalLM (AutoConfig,
    AutoModelForCausalLM) and GroveMoeKernelsModel (AutoModel), reading and writing the
    released checkpoint format, without trust_remote_code;
and provides apply_grove_kernels(model), which swaps the sparse blocks of a model built from the
released remote code for fused ones in place, keeping its state_dict names.
"""
try:
    import transformers as _transformers
except ImportError as exc:  # pragma: no cover - exercised where transformers is absent
    raise ImportError("grove_kernels.integrations.transformers needs transformers >= 5: "
                      "pip install 'grove-kernels[transformers]'") from exc

if int(_transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"grove_kernels.integrations.transformers needs transformers >= 5 (its "
                      f"ExpertsInterface), found {_transformers.__version__}: "
                      f"pip install 'grove-kernels[transformers]'")

from . import experts as _experts, modeling as _modeling  # noqa: E402
from .experts import (NAME, UnsupportedExpertsError, check_experts_module,  # noqa: E402
                      grove_kernels_experts_forward)
from .modeling import (GroveMoeConfig, GroveMoeForCausalLM, GroveMoeKernelsModel,  # noqa: E402
                       GroveMoePreTrainedModel, GroveMoeSparseMoeBlock)
from .swap import ReleasedLayoutGroveMoE, apply_grove_kernels  # noqa: E402


def register():
    """(Re-)register everything above in transformers; importing this module already did."""
    _experts.register()
    _modeling.register()


register()

__all__ = [
    "NAME", "UnsupportedExpertsError", "check_experts_module", "grove_kernels_experts_forward",
    "GroveMoeConfig", "GroveMoeForCausalLM", "GroveMoeKernelsModel", "GroveMoePreTrainedModel",
    "GroveMoeSparseMoeBlock",
    "ReleasedLayoutGroveMoE", "apply_grove_kernels", "register",
]
