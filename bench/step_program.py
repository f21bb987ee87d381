"""Whether a change leaves the default train steps' programs alone: a hash of each recipe's lowered step.

    python bench/step_program.py                          # this checkout
    PYTHONPATH=/path/to/other/checkout python bench/step_program.py
    python bench/step_program.py --smoke                  # seconds: finetune_tuab's hash alone

The StableHLO text of `Trainer(exp, ..., abstract=True).lower()` for finetune_tuab, pretrain_base and
train_tokenizer at batch 8, with source locations stripped (they name lines that move). The same hash on two
checkouts means the same compiled step, so the same speed: no timing needed.
"""
import argparse
import dataclasses
import hashlib

from labram_jax.recipes import finetune_tuab, pretrain_base, train_tokenizer
from labram_jax.train.trainer import Trainer


def program_hash(exp) -> tuple[str, int]:
    text = Trainer(exp, "/nonexistent-step-program", abstract=True).lower().as_text()
    body = "\n".join(line.split(" loc(")[0] for line in text.splitlines() if not line.startswith("#loc"))
    return hashlib.sha256(body.encode()).hexdigest()[:16], len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds: one recipe")
    args = parser.parse_args()
    recipes = (("finetune_tuab", finetune_tuab), ("pretrain_base", pretrain_base), ("train_tokenizer", train_tokenizer))
    for name, recipe in recipes[:1] if args.smoke else recipes:
        exp = recipe.config()
        digest, size = program_hash(exp.replace(train=dataclasses.replace(exp.train, batch_size=8)))
        print(f"{name}\t{digest}\t{size} characters")


if __name__ == "__main__":
    main()
