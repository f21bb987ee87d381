"""VQ-NSP tokenizer training (run_vqnsp_training.py with the README's flags).

8192 x 64 codebook with k-means init and EMA 0.99; AdamW betas (0.9, 0.99), weight decay 1e-4; 100 epochs with 10
of warmup. The original scales its base lr 5e-5 by global batch / 128 (8 GPUs x 128 -> 4e-4); so do we.
"""
from labram_jax import configs
from labram_jax.train.config import DataConfig, Experiment, TrainConfig

BATCH = 1024


def config() -> Experiment:
    return Experiment(
        stage="tokenizer",
        tokenizer=configs.tokenizer_base(),
        data=DataConfig(max_channels=64, max_patches=4),  # <= 256 tokens a window, as the original
        train=TrainConfig(epochs=100, warmup_epochs=10, batch_size=BATCH, lr=5e-5 * BATCH / 128, min_lr=1e-5,
                          weight_decay=1e-4, b1=0.9, b2=0.99, eps=1e-8),
    )
