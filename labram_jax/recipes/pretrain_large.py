"""LaBraM-Large (46M) masked EEG modeling: the base recipe with the large model."""
from labram_jax import configs
from labram_jax.recipes import pretrain_base
from labram_jax.train.config import Experiment


def config() -> Experiment:
    return pretrain_base.config(configs.large())
