"""The launcher of the finetune_eegmat recipe (labram_jax/recipes/finetune_eegmat.py); the same as `labram train finetune_eegmat`.

    python experiments/finetune_eegmat.py --workdir W --data DIR [--set KEY=VALUE ...] [--seeds 0,1,2]
"""
from labram_jax.recipes.finetune_eegmat import config
from labram_jax.train.launch import main

if __name__ == "__main__":
    raise SystemExit(main(config))
