"""LaBraM-Base fine-tuning on PhysioNet EEGMAT, rest vs mental arithmetic: the TUAB recipe (one logit, BCE) on
the EEGMAT builder's 20-channel windows. The set is small (36 subjects), so the global batch is 64, not 512."""
from labram_jax.recipes import finetune_tuab
from labram_jax.train.config import Experiment


def config() -> Experiment:
    return finetune_tuab.config(channels=20, seconds=4, batch=64)
