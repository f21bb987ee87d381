"""The original LaBraM (github 935963004/LaBraM), imported at run time from a checkout the user points at.

Nothing of the original is copied into this project: the bench scripts and fixture makers import its modules from
`--reference` with the peer's interpreter (torch 2.13.0 CPU, einops, pillow, timm 0.4.12 with --no-deps; the
training engines' `utils` also needs numpy, scipy, pandas, scikit-learn, h5py and tensorboardX, all torch-free).
../shared/notes/peer_setup.md says how to make that interpreter.
"""
from __future__ import annotations

import sys
import types
from functools import partial
from typing import Any

# The TINY reference set's sizes (tests/fixtures/reference_tiny/meta.json), built through the original's classes.
TINY = dict(embed_dim=100, depth=2, num_heads=5, out_chans=4, mlp_ratio=2.0)
TINY_TOKENIZER = dict(encoder_depth=2, decoder_depth=1, codebook_size=512, code_dim=64)
DEPTH = {"tiny": 2, "base": 12, "large": 24, "huge": 48}


def _accuracy(target, output, metrics, threshold=0.5):
    import numpy as np
    return {"accuracy": float(np.mean((np.asarray(output).reshape(-1) >= threshold) == np.asarray(target).reshape(-1)))}


def import_original(reference: str) -> None:
    """Put the checkout on sys.path, with inert stand-ins for the imports these runs never use.

    timm 0.4.12 imports torchvision for its data pipeline only, and no torchvision wheel loads beside the CPU torch
    here. `utils` imports pyhealth for its metrics; of them the fine-tuning engine only logs a training accuracy,
    which the stand-in computes (it never feeds back into training). The engines call torch.cuda.synchronize()
    after each step, which a CPU build of torch refuses; there is nothing to wait for on the CPU.
    """
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                 "torchvision.datasets", "torchvision.ops"):
        sys.modules.setdefault(name, types.ModuleType(name))
    try:
        import pyhealth.metrics  # noqa: F401
    except ImportError:
        metrics = types.ModuleType("pyhealth.metrics")
        metrics.binary_metrics_fn = _accuracy
        metrics.multiclass_metrics_fn = _accuracy
        sys.modules["pyhealth"] = types.ModuleType("pyhealth")
        sys.modules["pyhealth.metrics"] = metrics
    import torch
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None
    sys.path.insert(0, reference)


class Recorder:
    """The original's loss scaler with a record of each step's loss and lr: the engines call it once a step, after
    setting the step's lr, with the step's loss (divided by the accumulation steps, 1 here)."""

    def __init__(self, scaler: Any, optimizer: Any):
        self.scaler, self.optimizer, self.losses, self.lrs = scaler, optimizer, [], []

    def __call__(self, loss: Any, optimizer: Any, **kwargs: Any) -> Any:
        self.losses.append(loss.item())
        self.lrs.append(max(group["lr"] for group in optimizer.param_groups))
        return self.scaler(loss, optimizer, **kwargs)

    def state_dict(self) -> dict:
        # A disabled GradScaler (no CUDA) has an empty state, where the engines read its scale for their logs.
        return self.scaler.state_dict() or {"scale": 1.0}


class Wrapped:
    """The engines reach the tokenizer through `model.module` (as under DistributedDataParallel)."""

    def __init__(self, module: Any):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> Any:
        return self.module.train(mode)

    def parameters(self) -> Any:
        return self.module.parameters()


def tokenizer(size: str, decay: float = 0.99, kmeans_init: bool = False) -> Any:
    """A fresh VQ-NSP tokenizer, by default without k-means init (its codebook l2-normalised randn, as the
    reference sets); with it, the codebook is k-means of the first training batch, as run_vqnsp_training.py's.

    The original trains one tokenizer, the base one, for every model size; TINY is the reference set's.
    """
    import modeling_vqnsp
    if size != "tiny":
        return modeling_vqnsp.vqnsp_encoder_base_decoder_3x200x12(
            pretrained=False, as_tokenzer=False, EEG_size=1600, n_code=8192, code_dim=64, decay=decay,
            quantize_kmeans_init=kmeans_init)
    encoder, decoder = modeling_vqnsp.get_model_default_params(), modeling_vqnsp.get_model_default_params()
    common = dict(embed_dim=TINY["embed_dim"], num_heads=TINY["num_heads"], mlp_ratio=TINY["mlp_ratio"], num_classes=0)
    encoder.update(depth=TINY_TOKENIZER["encoder_depth"], out_chans=TINY["out_chans"], **common)
    decoder.update(depth=TINY_TOKENIZER["decoder_depth"], patch_size=1,
                   EEG_size=encoder["EEG_size"] // encoder["patch_size"], in_chans=TINY_TOKENIZER["code_dim"],
                   **common)
    return modeling_vqnsp.VQNSP(encoder, decoder, n_embed=TINY_TOKENIZER["codebook_size"],
                                embed_dim=TINY_TOKENIZER["code_dim"], decoder_out_dim=200, decay=decay,
                                quantize_kmeans_init=kmeans_init)


def pretrain_model(size: str, vocab_size: int) -> Any:
    """NeuralTransformerForMEM as run_labram_pretraining.py builds it with the README's flags (no drop path)."""
    import torch
    import modeling_pretrain
    flags = dict(drop_path_rate=0.0, init_values=0.1, use_abs_pos_emb=True, use_shared_rel_pos_bias=False,
                 vocab_size=vocab_size)
    if size != "tiny":
        factory = getattr(modeling_pretrain, f"labram_{size}_patch200_1600_8k_vocab")
        return factory(pretrained=False, use_rel_pos_bias=False, **flags)
    norm = partial(torch.nn.LayerNorm, eps=1e-6)
    return modeling_pretrain.NeuralTransformerForMEM(qk_norm=norm, norm_layer=norm, patch_size=200, qkv_bias=False,
                                                     **TINY, **flags)


def finetune_model(size: str, num_classes: int) -> Any:
    """NeuralTransformer as run_class_finetuning.py builds it with the README's flags, drop path off."""
    import torch
    import modeling_finetune
    flags = dict(num_classes=num_classes, drop_path_rate=0.0, use_mean_pooling=True, init_values=0.1,
                 qkv_bias=False, use_abs_pos_emb=True, use_rel_pos_bias=False)
    if size != "tiny":
        return getattr(modeling_finetune, f"labram_{size}_patch200_200")(**flags)
    norm = partial(torch.nn.LayerNorm, eps=1e-6)
    return modeling_finetune.NeuralTransformer(qk_norm=norm, norm_layer=norm, EEG_size=1600, patch_size=200,
                                               init_scale=0.001, **TINY, **flags)
