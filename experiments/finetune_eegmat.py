"""LaBraM-Base fine-tuning on PhysioNet EEGMAT, rest vs mental arithmetic: the TUAB recipe (one logit, BCE) on
the EEGMAT builder's 20-channel windows. The set is small (36 subjects), so the global batch is 64, not 512."""
from labram_jax.train.config import Experiment
from labram_jax.train.launch import main

import finetune_tuab


def config() -> Experiment:
    return finetune_tuab.config(channels=20, seconds=4, batch=64)


if __name__ == "__main__":
    raise SystemExit(main(config))
