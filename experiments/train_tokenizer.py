"""The launcher of the train_tokenizer recipe (labram_jax/recipes/train_tokenizer.py); the same as `labram train train_tokenizer`.

    python experiments/train_tokenizer.py --workdir W --data DIR [--set KEY=VALUE ...] [--seeds 0,1,2]
"""
from labram_jax.recipes.train_tokenizer import config
from labram_jax.train.launch import main

if __name__ == "__main__":
    raise SystemExit(main(config))
