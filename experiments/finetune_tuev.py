"""The launcher of the finetune_tuev recipe (labram_jax/recipes/finetune_tuev.py); the same as `labram train finetune_tuev`.

    python experiments/finetune_tuev.py --workdir W --data DIR [--set KEY=VALUE ...] [--seeds 0,1,2]
"""
from labram_jax.recipes.finetune_tuev import config
from labram_jax.train.launch import main

if __name__ == "__main__":
    raise SystemExit(main(config))
