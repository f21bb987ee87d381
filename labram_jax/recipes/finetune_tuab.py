"""LaBraM-Base fine-tuning on TUAB, abnormal EEG detection (run_class_finetuning.py, README flags).

One logit with BCE; global batch 512 (8 x 64), lr 5e-4, min lr 1e-6, 5 of 50 epochs warmup, weight decay 0.05,
layer decay 0.65, drop path 0.1, layer scale 0.1, no qkv bias, abs pos emb. Windows are 23 channels x 10 s.
Start from a pretrained model with --set init=PATH (.pth or export). As the original, the validation split is scored
every epoch, the best checkpoint is the one with the highest validation accuracy, and the run reports the test
metrics of that checkpoint (best_test/...). The window shape comes from the data's manifests unless set.
"""
from labram_jax import configs
from labram_jax.train.config import DataConfig, Experiment, TrainConfig


def config(num_classes: int = 1, task_kind: str = "binary", channels: int = 23, seconds: int = 10,
           batch: int = 512) -> Experiment:
    return Experiment(
        stage="finetune", task_kind=task_kind,
        model=configs.base(num_classes=num_classes, drop_path_rate=0.1, init_values=0.1, qkv_bias=False),
        data=DataConfig(max_channels=channels, max_patches=seconds),
        train=TrainConfig(epochs=50, warmup_epochs=5, batch_size=batch, lr=5e-4, min_lr=1e-6, weight_decay=0.05,
                          b1=0.9, b2=0.999, eps=1e-8, layer_decay=0.65,
                          label_smoothing=0.1 if task_kind == "multiclass" else 0.0, eval_epochs=1,
                          best_metric="val/accuracy"),
    )
