"""The analytic FLOP count of a training step against XLA's cost analysis of the compiled step."""
import dataclasses

import jax
import pytest

from labram_jax import configs
from labram_jax.train import flops
from labram_jax.train.config import DataConfig, Experiment, TrainConfig

DATA, TRAIN = DataConfig(max_channels=8, max_patches=4), TrainConfig(batch_size=4)
EXPERIMENTS = {
    "pretrain": Experiment(stage="pretrain", model=configs.tiny(vocab_size=512), tokenizer=configs.tokenizer_tiny(),
                           data=DATA, train=TRAIN),
    "finetune": Experiment(stage="finetune", model=configs.tiny(num_classes=3), task_kind="multiclass", data=DATA,
                           train=TRAIN),
    "tokenizer": Experiment(stage="tokenizer", tokenizer=configs.tokenizer_tiny(), data=DATA, train=TRAIN),
}
# Packed rows of 40 patch tokens and 3 window slots: the step runs over 43 tokens a row, not the grid's 33.
PACKED = DataConfig(max_channels=8, max_patches=4, pack_tokens=40, pack_windows=3)
EXPERIMENTS |= {f"{stage} packed": dataclasses.replace(EXPERIMENTS[stage], data=PACKED)
                for stage in ("pretrain", "tokenizer")}


@pytest.mark.parametrize("stage", sorted(EXPERIMENTS))
def test_analytic_flops_against_xla(stage, tmp_path):
    from labram_jax.train.trainer import Trainer

    exp = EXPERIMENTS[stage]
    xla = Trainer(exp, tmp_path, abstract=True, devices=jax.devices()[:1]).step_flops()
    # Matmuls and attention only: XLA also counts norms, GELU, softmax and the masking, so it is somewhat higher.
    assert 0.65 < flops.step_flops(exp) / xla < 1.0


def test_flops_scale_with_the_config():
    exp = EXPERIMENTS["pretrain"]
    deeper = exp.replace(model=exp.model.replace(depth=4))
    block = flops.transformer_flops(deeper.model, 32) - flops.transformer_flops(exp.model, 32)
    d, length = exp.model.embed_dim, 8 * 4 + 1
    assert block == 2 * length * (2 * (4 * d * d + 2 * d * exp.model.mlp_dim) + 4 * length * d)
    # two more blocks in each of the student's two passes, trained (3x), per window; the tokenizer is unchanged
    assert flops.step_flops(deeper) - flops.step_flops(exp) == exp.train.batch_size * 3 * 2 * block
    doubled = exp.replace(train=dataclasses.replace(exp.train, batch_size=8))
    assert flops.step_flops(doubled) == 2 * flops.step_flops(exp)
