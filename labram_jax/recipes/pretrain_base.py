"""LaBraM-Base masked EEG modeling (run_labram_pretraining.py with the README's flags).

Global batch 512 (8 GPUs x 64), lr 5e-4 (not batch-scaled by the original), min lr 1e-5, 5 of 50 epochs warmup,
AdamW betas (0.9, 0.98), weight decay 0.05, gradient clipping 3.0, layer scale 0.1, no drop path, mask ratio 0.5
with the symmetric pass. Targets come from a trained tokenizer: --set tokenizer_checkpoint=PATH.
"""
from labram_jax import configs
from labram_jax.train.config import DataConfig, Experiment, TrainConfig


def config(model: configs.TransformerConfig = configs.base()) -> Experiment:
    return Experiment(
        stage="pretrain",
        model=model.replace(vocab_size=8192, init_values=0.1, drop_path_rate=0.0, qkv_bias=False),
        tokenizer=configs.tokenizer_base(),
        data=DataConfig(max_channels=64, max_patches=4),
        train=TrainConfig(epochs=50, warmup_epochs=5, batch_size=512, lr=5e-4, min_lr=1e-5, weight_decay=0.05,
                          b1=0.9, b2=0.98, eps=1e-8, clip_grad=3.0, mask_ratio=0.5),
    )
