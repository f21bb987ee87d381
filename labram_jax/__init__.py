"""labram-jax: LaBraM (Large Brain Model, ICLR 2024) in JAX/Flax."""
from labram_jax import configs
from labram_jax.channels import resolve_channels
from labram_jax.convert import from_pytorch, to_pytorch
from labram_jax.models.labram import LaBraM, LaBraMForMEM, mem_loss
from labram_jax.models.vqnsp import VQNSP

__version__ = "0.1.0"
__all__ = ["configs", "resolve_channels", "from_pytorch", "to_pytorch", "LaBraM", "LaBraMForMEM", "VQNSP",
           "mem_loss", "__version__"]
