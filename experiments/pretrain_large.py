"""The launcher of the pretrain_large recipe (labram_jax/recipes/pretrain_large.py); the same as `labram train pretrain_large`.

    python experiments/pretrain_large.py --workdir W --data DIR [--set KEY=VALUE ...] [--seeds 0,1,2]
"""
from labram_jax.recipes.pretrain_large import config
from labram_jax.train.launch import main

if __name__ == "__main__":
    raise SystemExit(main(config))
