"""LaBraM-Large (46M) masked EEG modeling: the base recipe with the large model."""
from labram_jax import configs
from labram_jax.train.config import Experiment
from labram_jax.train.launch import main

import pretrain_base


def config() -> Experiment:
    return pretrain_base.config(configs.large())


if __name__ == "__main__":
    raise SystemExit(main(config))
