"""The stage objects: each owns what differs between tokenizer training, pretraining and fine-tuning."""
import pytest
from flax import nnx

from labram_jax import configs
from labram_jax.models.labram import LaBraM
from labram_jax.train.config import Experiment, TrainConfig, override
from labram_jax.train.stages import STAGES


def test_each_stage_names_the_model_kind_it_trains_and_starts_from():
    assert {name: (s.kind, s.init_kinds) for name, s in STAGES.items()} == {
        "tokenizer": ("tokenizer", ("tokenizer",)), "pretrain": ("pretrain", ("pretrain",)),
        # fine-tuning keeps a pretraining checkpoint's student, as the original's loader
        "finetune": ("classify", ("classify", "pretrain"))}


def test_each_stage_owns_the_optimizer_groups_of_its_model():
    # The models' no_weight_decay() sets; pretraining never reaches the student's lm_head or projection_head.
    assert STAGES["finetune"].groups.no_weight_decay == {"pos_embed", "cls_token", "time_embed"}
    assert STAGES["pretrain"].groups.no_weight_decay == {"student.cls_token", "student.pos_embed",
                                                         "student.time_embed"}
    assert "encoder.time_embed" in STAGES["tokenizer"].groups.no_weight_decay
    assert STAGES["pretrain"].groups.unused == ("student.lm_head.", "projection_head.")
    assert [name for name, s in STAGES.items() if s.groups.layer_decay] == ["finetune"]


@pytest.mark.parametrize("mode,trained", [("full", None), ("linear_probe", {"fc_norm", "head"})])
def test_the_stage_says_what_trains(mode, trained):
    exp = Experiment("finetune", model=configs.tiny(num_classes=2), train=TrainConfig(mode=mode))
    model = nnx.eval_shape(lambda: LaBraM(exp.model, rngs=nnx.Rngs(0)))
    params = nnx.to_flat_state(nnx.state(model, STAGES["finetune"].trainable(exp)))
    assert {path[0] for path, _ in params} == (trained or {path[0] for path, _ in
                                                           nnx.to_flat_state(nnx.state(model, nnx.Param))})


def test_the_stage_picks_the_default_metric_and_its_direction():
    finetune = Experiment("finetune")
    assert STAGES["finetune"].best_metric(finetune) == ("val/accuracy", True)
    assert STAGES["finetune"].best_metric(finetune.replace(task_kind="regression")) == ("val/r2", True)
    assert STAGES["pretrain"].best_metric(Experiment("pretrain")) == ("val/loss", False)
    assert STAGES["finetune"].best_metric(override(finetune, "train.best_metric=val/loss")) == ("val/loss", False)


def test_class_weights_weigh_each_window_by_its_label_and_default_to_the_original():
    import jax.numpy as jnp
    import numpy as np

    from labram_jax.train.stages import classification_loss

    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(6, 1)).astype(np.float32), np.array([0, 1, 1, 0, 0, 1], np.int32)
    valid = np.array([1, 1, 1, 1, 1, 0], bool)
    batch = {"label": jnp.asarray(y), "valid": jnp.asarray(valid)}
    per = np.maximum(z[:, 0], 0) - z[:, 0] * y + np.log1p(np.exp(-np.abs(z[:, 0])))
    w = np.where(y == 1, 3.0, 1.0) * valid  # torch's weighted mean: sum(w * loss) / sum(w)
    np.testing.assert_allclose(classification_loss(jnp.asarray(z), batch, "binary", 0.0, (1.0, 3.0)),
                               (w * per).sum() / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(classification_loss(jnp.asarray(z), batch, "binary", 0.0),
                               per[valid].mean(), rtol=1e-6)
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    nll, wc = -logp[np.arange(6), y], np.array([0.5, 2.0, 1.0])[y] * valid
    np.testing.assert_allclose(classification_loss(jnp.asarray(logits), batch, "multiclass", 0.0, (0.5, 2.0, 1.0)),
                               (wc * nll).sum() / wc.sum(), rtol=1e-6)
    assert TrainConfig().class_weights == ()
