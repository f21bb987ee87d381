"""labram-jax: LaBraM (Large Brain Model, ICLR 2024) in JAX/Flax.

The public names are imported on first use (PEP 562): a process that needs only part of the package (a corpus
worker, a recipe's command line before it runs again with huge pages) does not pay for JAX, Flax and the
PyTorch converters at `import labram_jax`.
"""
import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {"configs": "labram_jax.configs", "resolve_channels": "labram_jax.channels",
           "from_pytorch": "labram_jax.convert", "to_pytorch": "labram_jax.convert",
           "LaBraM": "labram_jax.models.labram", "LaBraMForMEM": "labram_jax.models.labram",
           "mem_loss": "labram_jax.models.labram", "VQNSP": "labram_jax.models.vqnsp"}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'labram_jax' has no attribute {name!r}")
    module = importlib.import_module(_PUBLIC[name])
    value = module if name == "configs" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
