"""LaBraM-Base fine-tuning on TUEV, six event types: the TUAB recipe with a 6-class head, label smoothing 0.1
(timm's LabelSmoothingCrossEntropy, the original's default) and 23 channels x 5 s windows."""
from labram_jax.recipes import finetune_tuab
from labram_jax.train.config import Experiment


def config() -> Experiment:
    return finetune_tuab.config(num_classes=6, task_kind="multiclass", seconds=5)
