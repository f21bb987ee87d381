"""The launcher of the pretrain_base recipe (labram_jax/recipes/pretrain_base.py); the same as `labram train pretrain_base`.

    python experiments/pretrain_base.py --workdir W --data DIR [--set KEY=VALUE ...] [--seeds 0,1,2]
"""
from labram_jax.recipes.pretrain_base import config
from labram_jax.train.launch import main

if __name__ == "__main__":
    raise SystemExit(main(config))
