"""LaBraM-Base fine-tuning on PhysioNet EEGMAT, rest vs mental arithmetic: the TUAB recipe (one logit, BCE) on
the EEGMAT builder's 20-channel windows. The set is small (36 subjects), so the global batch is 64, not 512.

Tuned for EEGMAT on the validation subjects only (28-31; bench/RESULTS.md, "Does pretraining help?"); the original
had no EEGMAT recipe. EEGMAT holds three rest windows to each task window (182-s and 62-s recordings): unweighted,
a model that has not yet separated the classes predicts "rest" for every window at the 0.5 threshold, and the
checkpoint picked by validation accuracy is often that one (balanced accuracy 0.5). So the task windows weigh 3 in
the loss, and the best checkpoint is the one with the highest validation AUROC, which a threshold does not move.
"""
import dataclasses

from labram_jax.recipes import finetune_tuab
from labram_jax.train.config import Experiment


def config() -> Experiment:
    exp = finetune_tuab.config(channels=20, seconds=4, batch=64)
    return exp.replace(train=dataclasses.replace(exp.train, class_weights=(1.0, 3.0), best_metric="val/roc_auc"))
