"""The launcher of the finetune_tuab recipe (labram_jax/recipes/finetune_tuab.py); the same as `labram train finetune_tuab`.

    python experiments/finetune_tuab.py --workdir W --data DIR [--set KEY=VALUE ...] [--seeds 0,1,2]
"""
from labram_jax.recipes.finetune_tuab import config
from labram_jax.train.launch import main

if __name__ == "__main__":
    raise SystemExit(main(config))
