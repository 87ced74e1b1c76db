"""lightning-fpq: floating-point quantized training for PyTorch Lightning.

Public names are imported lazily (PEP 562), so ``import lightning_fpq`` and the command line
stay fast and do not import Lightning until a Lightning-facing name is used.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "FPFormat": "lightning_fpq.formats",
    "quantize": "lightning_fpq.quantize",
    "pack": "lightning_fpq.packing",
    "unpack": "lightning_fpq.packing",
    "QuantRecipe": "lightning_fpq.recipe",
    "QuantLinear": "lightning_fpq.linear",
    "restore_linears": "lightning_fpq.linear",
    "FPQuantPrecision": "lightning_fpq.lightning.precision",
    "FPQuantFabricPrecision": "lightning_fpq.lightning.fabric",
    "CapybaraLaw": "lightning_fpq.scaling.capybara",
    "KumarLaw": "lightning_fpq.scaling.kumar",
    "ChinchillaLaw": "lightning_fpq.scaling.chinchilla",
    "count_params": "lightning_fpq.scaling.params",
    "fit": "lightning_fpq.scaling.fitting",
    "CriticalDataMonitor": "lightning_fpq.lightning.monitor",
    "ProgressivePrecision": "lightning_fpq.lightning.progressive",
    "TokenCounter": "lightning_fpq.lightning.tokens",
    "QuantizationHealth": "lightning_fpq.lightning.health",
    "QuantizationGap": "lightning_fpq.lightning.gap",
}
__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_fpq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
