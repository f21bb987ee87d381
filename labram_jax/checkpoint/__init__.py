"""Model exports: all variables of a model plus the config that rebuilds it."""
from labram_jax.checkpoint.export import is_export, load_model, model_config, save_model

__all__ = ["is_export", "load_model", "model_config", "save_model"]
