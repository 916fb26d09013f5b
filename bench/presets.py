"""Layer shapes the benchmarks run at: the package's presets (grove_kernels/presets.py) and the
token counts of a sweep."""
from grove_kernels.presets import PRESETS, Preset, get_preset  # noqa: F401

GPU_TOKENS = (1, 8, 64, 256, 1024, 4096, 16384)
SMOKE_PRESET = "tiny"
SMOKE_TOKENS = (1, 16, 64)


def default_tokens(preset, device_type):
    return GPU_TOKENS if device_type == "cuda" else preset.cpu_tokens
