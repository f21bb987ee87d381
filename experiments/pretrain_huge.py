"""The launcher of the pretrain_huge recipe (labram_jax/recipes/pretrain_huge.py); the same as `labram train pretrain_huge`.

    python experiments/pretrain_huge.py --workdir W --data DIR [--set KEY=VALUE ...] [--seeds 0,1,2]
"""
from labram_jax.recipes.pretrain_huge import config
from labram_jax.train.launch import main

if __name__ == "__main__":
    raise SystemExit(main(config))
