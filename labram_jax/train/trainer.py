"""One trainer for the three stages: a pure jitted step of (state, batch, rng) over a device mesh.

The state is a dict of pytrees: the trainable parameters, the model's other parameters (frozen in linear probing
or LoRA) and non-parameter state (the tokenizer's codebook), the optimizer state, the step, the run's RNG key and,
in pretraining, the frozen tokenizer. Every array is placed by the logical-axis rule table (labram_jax.sharding).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from labram_jax import compile_cache, configs, host, preemption, sharding
from labram_jax.checkpoint import load_model, model_config, save_model
from labram_jax.convert import from_pytorch
from labram_jax.configs import runtime_of, time_rows_of, with_runtime, with_time_rows
from labram_jax.convert.state_dict import (Model, build as build_model, kind_of, load_state_dict, rebuilt,
                                          resize_time_rows, state_dict, student_weights, weights_time_rows)
from labram_jax.data.pipeline import LoaderConfig, eval_dataset, make_dataset, restore_state, save_state
from labram_jax.errors import UserError
from labram_jax.files import write_json
from labram_jax.models.vqnsp import VQNSP
from labram_jax.train import metrics as paper_metrics
from labram_jax.train import outputs as eval_outputs
from labram_jax.train.checkpoints import Checkpoints
from labram_jax.train.config import Experiment
from labram_jax.train.flops import row_tokens, step_flops as analytic_step_flops
from labram_jax.train.logger import MetricLogger, device_peak_flops
from labram_jax.train.lora import add_lora, merge_lora
from labram_jax.train.optim import OptimConfig, cosine_schedule, make_optimizer, skip_unless
from labram_jax.train.progress import Progress
from labram_jax.train.stages import STAGES, check_labels, loss_weight, usage_and_perplexity

State = dict[str, Any]

# Settings the train step's program does not read: where the data comes from and how the host loads it, the seed
# (its keys and the weights it draws are the step's inputs), the checkpoint started from (its weights are), and
# the cadence of logs, validations and saves. A stored step's key leaves them out, so a sweep of seeds, of
# pretrained starts or of data subsets loads the step the first run stored instead of tracing it again.
NOT_IN_THE_STEP = ("init", "data.train", "data.val", "data.test", "data.weights", "data.workers", "data.pack_buffer",
                   "data.eval_batch_size", "train.seed", "train.log_every", "train.eval_every", "train.eval_epochs",
                   "train.save_every", "train.keep", "train.best_metric", "train.force_resume")


class NonFiniteLoss(RuntimeError):
    """A step produced a NaN or Inf loss or gradient (and the run was not asked to skip such steps)."""


def check_finite(unchecked: list[tuple[int, Any, dict]]) -> None:
    """Raise NonFiniteLoss for the first of the (step, loader position, metrics) whose loss or gradient was not
    finite, naming its step and batch; then forget them all."""
    flags = jax.device_get([m["finite"] for _, _, m in unchecked])
    bad = next((entry for entry, finite in zip(unchecked, flags) if not finite), None)
    unchecked.clear()
    if bad is not None:
        step, data_state, m = bad
        raise NonFiniteLoss(f"non-finite loss or gradient at step {step} (loss {float(m['loss'])}, grad "
                            f"norm {float(m['grad_norm'])}); the batch is the one after loader position "
                            f"{json.dumps(data_state)}; set train.skip_nonfinite=true to skip such steps")


def resolve_runtime(exp: Experiment, abstract: bool = False) -> Experiment:
    """The models' runtime fields from the experiment's runtime block, the one home of how they run: bf16 compute
    with float32 parameters on accelerators, float32 on CPU (unless set), and on a CPU the chunked attention
    (not for `abstract` ahead-of-time compilation, which plans for the pod's devices). A model config whose
    runtime field says otherwise (an Experiment built in Python) is refused rather than silently overwritten."""
    cpu, r = jax.default_backend() == "cpu", exp.runtime
    precision = r.precision if r.precision != "auto" else "float32" if cpu else "bfloat16"

    def attention(named: str) -> str | None:
        if named != "auto":
            return named
        return "chunked" if cpu and not abstract else None

    # remat "auto" runs as "none" until Trainer.fit_memory finds that the step does not fit
    runtime = {"dtype": precision, "remat": "none" if r.remat == "auto" else r.remat, "scan_blocks": r.scan_blocks}
    resolved = {"model": with_runtime(exp.model, **runtime, attention=attention(r.attention)),
                "tokenizer": with_runtime(exp.tokenizer, **runtime, attention=attention(r.tokenizer_attention))}
    for name, cfg in (("model", exp.model), ("tokenizer.encoder", exp.tokenizer.encoder),
                      ("tokenizer.decoder", exp.tokenizer.decoder)):
        want = resolved["model"] if name == "model" else resolved["tokenizer"].encoder
        for field, value in runtime_of(cfg).items():
            if value not in (getattr(configs.TransformerConfig(), field), getattr(want, field)):
                raise UserError(f"{name}.{field} is {value!r}, but how the models run is set in the runtime block "
                                f"(it gives {getattr(want, field)!r}): set runtime."
                                + {"dtype": "precision", "attention": "tokenizer_attention" if name != "model"
                                   else "attention"}.get(field, field))
    return exp.replace(**resolved)


def fit_time_rows(exp: Experiment) -> tuple[Experiment, list[str]]:
    """`exp` with as many time_embed rows as its windows have patches (data.max_patches) in the model it trains
    (the tokenizer's encoder and decoder in the tokenizer stage), as train.extend_time allows, and what changed, to
    be said. A checkpoint's rows are extended as the run loads it (Trainer._extended)."""
    need, tokenizer = exp.data.max_patches, exp.stage == "tokenizer"
    have = time_rows_of(exp.tokenizer if tokenizer else exp.model)
    if need <= have:
        return exp, []
    setting = "tokenizer.encoder.time_rows and tokenizer.decoder.time_rows" if tokenizer else "model.time_rows"
    if exp.train.extend_time == "off":
        raise UserError(f"windows of {need} patches (data.max_patches) are longer than the model's {have} time_embed "
                        f"rows and train.extend_time is off: set {setting}={need}, or train.extend_time=linear")
    exp = exp.replace(tokenizer=with_time_rows(exp.tokenizer, need)) if tokenizer else \
        exp.replace(model=with_time_rows(exp.model, need))
    return exp, [f"windows of {need} s are longer than the model's {have} time_embed rows: {setting}={need}"]


def load_weights(path: str, kind: str, runtime: dict | None = None) -> Model:
    """A model from a .pth (the original's layout, read as `kind`) or a labram-jax export directory, built with
    `runtime` settings (configs.RUNTIME_FIELDS) where given."""
    if Path(path).is_dir():
        return load_model(path, torch_order=False, runtime=runtime)
    model = from_pytorch(path, kind)
    return rebuilt(model, with_runtime(model.cfg, **runtime)) if runtime else model


def strong_types(tree: Any) -> Any:
    """The tree without JAX weak types (`jnp.full(d, 0.1)` makes one, as layer scale does): a step's outputs are
    strongly typed, so a weakly typed input would compile the step a second time on the next call."""
    def strong(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        return leaf.astype(leaf.dtype) if getattr(leaf, "weak_type", False) else leaf
    return jax.tree.map(strong, tree)


def run_traced(traced: jax.stages.Traced, out_shardings: Any, *args: Any) -> Any:
    """What `traced` computes from `args`, run under jit with `out_shardings` (a prefix of its output's tree, as
    jit's), without tracing its function again."""
    per_leaf = jax.tree.map(lambda s, part: jax.tree.map(lambda _: s, part), out_shardings, traced.out_info)
    program = jax.jit(jax.extend.core.jaxpr_as_fun(traced.jaxpr), out_shardings=jax.tree.leaves(per_leaf))
    return traced.out_tree.unflatten(program(*jax.tree.leaves(args)))


def _layout(tree: Any) -> list[str]:
    """Each leaf's path, shape, dtype and sharding."""
    return [f"{jax.tree_util.keystr(path)} {leaf.shape} {leaf.dtype} {getattr(leaf, 'sharding', None)}"
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


class UnderPrecision:
    """A jitted function traced (and so compiled and cached) under one default matmul precision, and for the train
    step under its mesh: the layers leave precision to the run, so that accelerators can take their fast paths
    where the run computes in bf16, and lay out their activations on the mesh they are traced under
    (sharding.constrain)."""

    def __init__(self, fn: Any, precision: str, mesh: jax.sharding.Mesh | None = None):
        self.fn, self.precision, self.mesh = fn, precision, mesh

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(jax.default_matmul_precision(self.precision))
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
        return stack

    def __call__(self, *args: Any) -> Any:
        with self._context():
            return self.fn(*args)

    def lower(self, *args: Any) -> Any:
        with self._context():
            return self.fn.lower(*args)


class SeenCounter:
    """The real windows and patch tokens (padding left out) the training steps have consumed, over all processes
    and sessions: the x of a loss curve or a scaling law, exact whatever the packing."""

    def __init__(self, resumed: dict | None):
        self._base = np.asarray([0, 0] if resumed is None else [resumed["windows_seen"], resumed["tokens_seen"]],
                                np.int64)
        self._local = np.zeros(2, np.int64)  # this process's, since this session started

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Count a batch of this process's rows, before it goes to the devices."""
        self._local += (int(np.count_nonzero(batch["valid"])), int(np.count_nonzero(batch["mask"])))

    def total(self) -> dict[str, int]:
        """The global counts; a collective where there are several processes (every process calls it)."""
        local = self._local
        if jax.process_count() > 1:
            local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2).sum(0)
        windows, tokens = (self._base + local).tolist()
        return {"windows_seen": windows, "tokens_seen": tokens}


class EvaluationStopped(Exception):
    """A stop signal arrived while a training run validated: the run saves and the rerun validates again."""


class Trainer:
    def __init__(self, exp: Experiment, workdir: str | os.PathLike, *, abstract: bool = False,
                 devices: Sequence[jax.Device] | None = None):
        """abstract=True builds shapes and shardings only (no arrays), for ahead-of-time compilation. `devices`:
        the mesh's devices (default: all of them), e.g. one device to compare a run with its sharded twin."""
        self.given = exp
        # What the run changed in its models to fit the data, said in one line once they are built.
        self.exp, self._time_notes = fit_time_rows(resolve_runtime(exp, abstract))
        self.workdir, self.devices = Path(workdir), devices
        self.abstract = abstract
        self.stage = STAGES[exp.stage]
        self.mesh = sharding.make_mesh(exp.mesh.data, exp.mesh.fsdp, exp.mesh.tensor, devices)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        build = nnx.eval_shape if abstract else (lambda f: f())
        # A stored train step loads (XLA rebuilding it, 3-6 s for a base model) while the models and the optimizer
        # state are built below; an ahead-of-time check compiles for devices this host only simulates: nothing to
        # keep.
        self._step_key = None if abstract else compile_cache.step_key(self._step_parts())
        self._stored = self._step_key and compile_cache.stored_step(self._step_key, list(self.mesh.devices.flat))
        self.tokenizer_graphdef, frozen = None, None
        if exp.stage == "pretrain":
            tokenizer = build(self._tokenizer)
            if tokenizer.cfg.codebook_size != self.exp.model.vocab_size:
                raise UserError(f"the tokenizer has {tokenizer.cfg.codebook_size} codes but the model predicts "
                                f"{self.exp.model.vocab_size} (set model.vocab_size to the codebook size)")
            self.tokenizer_graphdef, frozen = nnx.split(tokenizer)
            frozen = strong_types(frozen)
        model = build(self._model)
        if self._time_notes and jax.process_index() == 0:
            print("; ".join(self._time_notes) + f" (train.extend_time={self.exp.train.extend_time}; off stops "
                  "instead)", file=sys.stderr, flush=True)
        self.graphdef, params, fixed, rest = strong_types(nnx.split(model, self.stage.trainable(self.exp), nnx.Param,
                                                                    ...))
        self.depth = (self.exp.tokenizer.encoder if exp.stage == "tokenizer" else self.exp.model).depth
        total = exp.train.steps
        t = self.exp.train
        self.optim_config = OptimConfig(lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, total_steps=total,
                                        weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps,
                                        clip_grad=t.clip_grad, layer_decay=t.layer_decay)
        self.schedule = cosine_schedule(t.lr, t.min_lr, total, t.warmup_steps)
        self.tx = make_optimizer(params, self.optim_config, self.stage.groups, self.depth)
        state = {"params": params, "fixed": fixed, "rest": rest, "frozen": frozen,
                 "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(t.seed))}
        # Traced once (tracing the masked groups over the Variable trees is most of a second for a base model):
        # its shapes give the shardings, then its program runs under jit with them, so the optimizer state is born
        # sharded, one buffer per leaf (optax's eager init can hand mu and nu one zeros buffer, which donation
        # rejects).
        opt_init = jax.jit(self.tx.init).trace(params)
        state["opt"] = opt_init.out_info
        self.shardings = sharding.tree_shardings(state, self.mesh)
        if not abstract:
            state = jax.device_put(dict(state, opt=None), dict(self.shardings, opt=None))
            state["opt"] = run_traced(opt_init, self.shardings["opt"], state["params"])
        self.state = state
        # Batches are split over the data-parallel devices, and each process loads an equal share of them.
        axes = self.batch_sharding.spec[0]
        axes = (axes,) if isinstance(axes, str) else axes or ()
        self.batch_multiple = math.lcm(math.prod(self.mesh.shape[a] for a in axes), jax.process_count())
        if t.batch_size % (self.batch_multiple * t.grad_accum):
            raise UserError(f"train.batch_size {t.batch_size} must split into {t.grad_accum} micro-batches of a "
                            f"multiple of {self.batch_multiple} (the data-parallel devices of mesh "
                            f"{dict(self.mesh.shape)} and the {jax.process_count()} processes)")
        precision = self.exp.runtime.matmul_precision
        if precision == "auto":
            precision = "highest" if self.exp.model.dtype == "float32" else "default"
        step = jax.jit(self._train_step, in_shardings=(self.shardings, self.batch_sharding, None),
                       out_shardings=(self.shardings, None), donate_argnums=0)
        outputs = jax.jit(self._eval_outputs, in_shardings=(self.shardings, self.batch_sharding))
        # Evaluation runs a window at a time under vmap, where the activations' batch is the vmapped axis.
        self._step, self._outputs = UnderPrecision(step, precision, self.mesh), UnderPrecision(outputs, precision)
        # The tokenizer's codes of whole batches under the mesh, as the step runs the model (train_pass).
        self._tokens = UnderPrecision(jax.jit(self._batch_tokens, in_shardings=(self.shardings, self.batch_sharding)),
                                      precision, self.mesh)
        self._compiled: Any = None
        self._stop: preemption.StopAgreement | None = None  # while a training run validates

    # -- model construction ------------------------------------------------------------------------------------
    def _model(self) -> nnx.Module:
        exp = self.exp
        model = self.stage.build(exp, nnx.Rngs(exp.train.seed))
        if exp.init:
            self._load_init(model)
        if exp.stage == "finetune" and exp.train.mode == "lora":
            add_lora(model, exp.train.lora_rank, exp.train.lora_alpha, nnx.Rngs(exp.train.seed + 1))
        return model

    def _load_init(self, model: nnx.Module) -> None:
        """Start from a checkpoint: fine-tuning keeps a pretraining model's `student.*` weights, as the original."""
        exp = self.exp
        source = load_weights(exp.init, self.stage.kind)
        if kind_of(source) not in self.stage.init_kinds:
            raise UserError(f"init {exp.init} holds a {kind_of(source)} model, but a {exp.stage} run starts from "
                            f"{' or '.join(self.stage.init_kinds)} weights"
                            + (" (a trained tokenizer goes in tokenizer_checkpoint)"
                                if kind_of(source) == "tokenizer" else ""))
        weights = state_dict(source)
        fresh: tuple[str, ...] = ()
        if exp.stage == "finetune":
            if any(k.startswith("student.") for k in weights):
                weights, fresh = student_weights(weights), ("fc_norm.", "head.")
            elif "head.weight" in weights and weights["head.weight"].shape[0] != exp.model.num_classes:
                weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
                fresh = ("head.",)
        weights = self._extended(weights, time_rows_of(model.cfg), f"init {exp.init}")
        load_state_dict(model, weights, allow_missing=fresh, source=exp.init)

    def _extended(self, weights: dict[str, np.ndarray], rows: int, source: str) -> dict[str, np.ndarray]:
        """A checkpoint's `weights` with fewer time_embed rows than `rows` extended as train.extend_time says (and
        noted); unchanged when it has them all, or when extension is off (the strict load then names the shape)."""
        method, have = self.exp.train.extend_time, weights_time_rows(weights)
        if have >= rows or method == "off":
            return weights
        self._time_notes.append(f"{source}'s {have} learned time_embed rows extended to {rows} ({method})")
        return resize_time_rows(weights, rows, method)

    def _tokenizer(self) -> nnx.Module:
        if self.exp.tokenizer_checkpoint:
            # It runs as this run's models do (the original computes the targets under the step's autocast).
            tokenizer = load_weights(self.exp.tokenizer_checkpoint, "tokenizer", runtime_of(self.exp.tokenizer))
            if kind_of(tokenizer) != "tokenizer":
                raise UserError(f"tokenizer_checkpoint {self.exp.tokenizer_checkpoint} holds a "
                                f"{kind_of(tokenizer)} model, not a tokenizer")
            need = self.exp.data.max_patches
            if time_rows_of(tokenizer.cfg) < need:
                if self.exp.train.extend_time == "off":
                    raise UserError(f"windows of {need} patches (data.max_patches) are longer than the "
                                    f"{self.exp.tokenizer_checkpoint} tokenizer's time_embed rows and "
                                    "train.extend_time is off")
                weights = self._extended(state_dict(tokenizer), need, f"tokenizer {self.exp.tokenizer_checkpoint}")
                tokenizer = build_model(with_time_rows(tokenizer.cfg, need), "tokenizer")
                load_state_dict(tokenizer, weights, source=self.exp.tokenizer_checkpoint)
            return tokenizer
        if self.abstract:  # shapes only (ahead-of-time compilation): the recipe's tokenizer config stands in
            return VQNSP(self.exp.tokenizer, rngs=nnx.Rngs(0))
        raise UserError("pretraining needs a trained tokenizer: set tokenizer_checkpoint")

    # -- the pure step ------------------------------------------------------------------------------------------
    # Modules are merged where they run, with copy=True: fresh Variables at the current trace level, so the
    # quantizer may update its codebook under jax.value_and_grad and nnx.remat may run inside scan or vmap (NNX
    # refuses to mutate Variables created at an outer trace).
    def _merge(self, state: State, params: Any, rest: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, params, state["fixed"], rest, copy=True)

    def _frozen(self, state: State) -> nnx.Module | None:
        """The frozen tokenizer of pretraining (None in the other stages)."""
        return None if state["frozen"] is None else nnx.merge(self.tokenizer_graphdef, state["frozen"], copy=True)

    def _train_step(self, state: State, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[State, dict]:
        exp, accum = self.exp, self.exp.train.grad_accum
        micro = jax.tree.map(lambda a: a.reshape((accum, a.shape[0] // accum) + a.shape[1:]), batch)

        def one(carry, mb):
            grads, rest, i = carry

            def loss_fn(params):
                model = self._merge(state, params, rest)
                loss, aux = self.stage.loss(model, mb, jax.random.fold_in(rng, i), exp, self._frozen(state))
                return loss, (aux, nnx.state(model, nnx.Not(nnx.Param)))

            (loss, (aux, new_rest)), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            if accum > 1:  # a micro-batch weighs as the windows its loss averages over
                g = jax.tree.map(lambda a: a * loss_weight(mb, exp), g)
            return (jax.tree.map(jnp.add, grads, g), new_rest, i + 1), (loss, aux)

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        if accum == 1:  # not as a loop of one: XLA's CPU backend ran the step's matmuls inside a loop 1.7x slower
            (grads, rest, _), (loss, aux) = one((zeros, state["rest"], 0), jax.tree.map(lambda a: a[0], micro))
        else:
            # The mean over the whole batch's windows, not over micro-batches: they differ where micro-batches
            # hold different numbers of windows (packing) or of class weight. Equal micro-batches weigh equally,
            # as the original's loss / update_freq.
            (grads, rest, _), (losses, aux) = jax.lax.scan(one, (zeros, state["rest"], 0), micro)
            weights = jax.vmap(lambda mb: loss_weight(mb, exp))(micro)
            total = jnp.maximum(weights.sum(), jnp.finfo(jnp.float32).tiny)
            mean = lambda values: (values * weights).sum() / total
            grads, loss, aux = jax.tree.map(lambda g: g / total, grads), mean(losses), jax.tree.map(mean, aux)
        grad_norm = optax.tree.norm(grads)
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if exp.train.skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            params, rest = keep(params, state["params"]), keep(rest, state["rest"])
            opt = skip_unless(finite, opt, state["opt"])
        new_state = dict(state, params=params, opt=opt, rest=rest, step=state["step"] + 1)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "lr": self.schedule(state["step"]), **aux}
        return new_state, metrics

    def _eval_outputs(self, state: State, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The stage's outputs window by window: a loss per row, so that the rows padding the last batch
        (valid=False, no real patch, which the models turn into NaN) can be left out of the mean."""
        def one(row):
            model = self._merge(state, state["params"], state["rest"])
            out = self.stage.outputs(model, jax.tree.map(lambda a: a[None], row), self.exp, self._frozen(state))
            return jax.tree.map(lambda a: a[0] if a.ndim else a, out)

        return jax.vmap(one)(batch) | {"label": batch["label"], "target": batch["target"], "valid": batch["valid"]}

    def _batch_tokens(self, state: State, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The eval-mode token ids of a padded batch [B, N*A] and which are real patches: the encoder only."""
        model = self._merge(state, state["params"], state["rest"])
        real = batch["mask"].reshape(batch["mask"].shape[0], -1)
        return {"tokens": model.tokenize(batch["x"], batch["input_chans"], mask=batch["mask"]), "real": real}

    # -- data ---------------------------------------------------------------------------------------------------
    def loader_config(self, batch_size: int) -> LoaderConfig:
        d = self.exp.data
        weights = dict(zip(map(str, d.train), d.weights)) if d.weights else None
        return LoaderConfig(batch_size=batch_size, max_channels=d.max_channels, max_patches=d.max_patches,
                            seed=self.exp.train.seed, workers=d.workers, weights=weights,
                            pack_tokens=d.pack_tokens, pack_windows=d.pack_windows, pack_buffer=d.pack_buffer)

    def global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A batch of this process's rows (host arrays) as one global array per field, placed on the mesh."""
        return multihost_utils.host_local_array_to_global_array(batch, self.mesh, self.batch_sharding.spec)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _over_split(self, program: Callable, paths: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
        """`program(state, batch)` over one pass of the windows of `paths` (1.5 x the training batch, as the
        original, unless data.eval_batch_size says), every process's share gathered."""
        size = self.exp.data.eval_batch_size or int(self.exp.train.batch_size * 1.5)
        size = max(size - size % self.batch_multiple, self.batch_multiple)
        for batch in eval_dataset({str(p): [p] for p in paths}, self.loader_config(size)):
            yield multihost_utils.process_allgather(program(self.state, self.global_batch(batch)), tiled=True)
            if self._stop is not None and self._stop():  # a validation in training: SIGTERM ends it here
                raise EvaluationStopped

    def evaluate(self, split: str, save_as: str = "") -> dict[str, float]:
        """The stage's metrics over a whole split, every process's share gathered first. save_as: fine-tuning
        also writes the per-window labels and logits to outputs/SAVE_AS.npz (labram_jax.train.outputs)."""
        chunks: dict[str, list[np.ndarray]] = {}
        for out in self._over_split(self._outputs, getattr(self.exp.data, split)):
            for key, value in out.items():
                chunks.setdefault(key, []).append(np.asarray(value))
        out = {k: np.concatenate(v) for k, v in chunks.items()}
        valid = out["valid"].astype(bool)
        result = {"loss": float(np.mean(out["loss"][valid]))}
        if self.exp.stage == "tokenizer":  # the reconstruction alone, without the codebook's commitment term
            result |= {k: float(np.mean(out[k][valid])) for k in ("rec_loss", "rec_angle_loss")}
        if self.exp.stage == "finetune":
            labels = out["label"] if self.exp.task_kind != "regression" else out["target"]
            result |= paper_metrics.task_metrics(self.exp.task_kind, labels[valid], out["logits"][valid])
            if save_as and jax.process_index() == 0:
                eval_outputs.save(self.workdir / "outputs" / f"{save_as}.npz", self.exp.task_kind, labels[valid],
                                  out["logits"][valid])
        return {f"{split}/{k}": v for k, v in result.items()}

    def train_pass(self) -> dict[str, float]:
        """The tokenizer's codebook usage and perplexity over one pass of every training window (real patches
        only, every process's share gathered first): per-batch usage is bounded by the batch's patches, so a
        codebook larger than a batch only shows its health over a whole split."""
        counts = np.zeros((self.exp.tokenizer.codebook_size,), np.int64)
        for out in self._over_split(self._tokens, self.exp.data.train):
            real = np.asarray(out["real"], bool)
            counts += np.bincount(np.asarray(out["tokens"])[real], minlength=counts.size)
        return {k: float(v) for k, v in usage_and_perplexity(counts.astype(np.float32)).items()}

    # -- exports ------------------------------------------------------------------------------------------------
    def model(self) -> nnx.Module:
        """The current model on the host (LoRA adapters folded into the weights).

        A collective: every process calls it, since a parameter sharded over several hosts is gathered from all
        of them (no single process can fetch it on its own).
        """
        graphdef, state = nnx.split(self._merge(self.state, self.state["params"], self.state["rest"]))
        model = nnx.merge(graphdef, multihost_utils.process_allgather(state, tiled=True))
        return merge_lora(model) if self.exp.train.mode == "lora" else model

    def export(self, name: str) -> Path:
        """A parameters-only export (labram convert turns it into a .pth) in workdir/name.

        The fresh export is written beside the old one, which is moved aside to `.name.old` before the fresh one
        takes its name and removed after, so a crash at any point leaves a complete export: at `name`, or
        between the two renames at `.name.old`, which the next export first puts back.
        """
        target, fresh, old = (self.workdir / n for n in (name, f".{name}.new", f".{name}.old"))
        model = self.model()
        if jax.process_index() == 0:
            if old.exists() and not target.exists():
                os.replace(old, target)
            for leftover in (fresh, old):
                shutil.rmtree(leftover, ignore_errors=True)
            save_model(model, fresh)
            if target.exists():
                os.replace(target, old)
            os.replace(fresh, target)
            shutil.rmtree(old, ignore_errors=True)
        multihost_utils.sync_global_devices(f"export {name}")
        return target

    # -- the loop -----------------------------------------------------------------------------------------------
    def train(self, progress: bool = True) -> dict[str, float]:
        """Train to train.steps, resuming from the latest checkpoint. On SIGTERM or SIGINT the step in flight
        finishes, a checkpoint of it is written and preemption.Preempted raised (every process at the same step).
        progress=False: no progress bar or lines (labram_jax.train.progress)."""
        # The checkpoints and the logger close on every way out (NonFiniteLoss, any error), so that an
        # asynchronous save in flight commits and the logs are flushed.
        with preemption.StopSignals("training") as signals, contextlib.ExitStack() as closing:
            self.fit_memory()
            return self._train(preemption.StopAgreement(signals), closing, progress)

    def planned_bytes(self) -> tuple[int, int] | None:
        """(the compiled step's bytes, what it may use): on a CPU for all this process's devices against the host's
        memory (its cgroup limit, host.memory_bytes), less what the process holds besides its arrays (Python, XLA's
        code, what compiling left resident) and a twentieth for the loader and what running the step adds; on an
        accelerator per device against the device's limit. None where XLA plans no memory."""
        memory = self.compiled_step().memory_analysis()
        if memory is None:
            return None
        per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                      + memory.temp_size_in_bytes)
        local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        if local[0].platform == "cpu":
            # Measured, not a fixed share: large pretraining on 23.6 GiB peaked 1.7 GiB above its plan at batch 32
            # (one compile before it) and 3.1 GiB at batch 64 (four).
            arrays = sum(a.on_device_size_in_bytes() for a in jax.live_arrays())
            held = max(0, host.resident_bytes() - arrays)
            planned, available = per_device * len(local), int(0.95 * host.memory_bytes()) - held
        else:
            limits = [(d.memory_stats() or {}).get("bytes_limit") for d in local]
            if not all(limits):
                return None
            planned, available = per_device, min(limits)
        if jax.process_count() > 1:  # every process must choose the same program: the tightest host decides
            available = int(np.min(multihost_utils.process_allgather(np.int64(available))))
        return planned, available

    def fit_memory(self) -> None:
        """Before the first step, the compiled step against the memory it may use. runtime.remat "auto" takes the
        first that fits of none, dots and block (dots keeps the matmuls' outputs, block only each block's input:
        in that order they keep less and recompute more), then block with the batch split into twice, four times...
        as many micro-batches (train.grad_accum, while the micro-batch still splits over the data-parallel devices;
        not for the tokenizer, whose codebook EMA would then move once per micro-batch, not once per batch). One line
        says what it chose where that is not the set config. A set remat that does not fit stops with exit 2 naming
        both figures. The choice goes into the run's config."""
        given = self.given  # rebuilt from as given: its model fields hold no remat of an earlier choice
        runtime, t = given.runtime, given.train
        if runtime.remat != "auto":
            choices = [(runtime.remat, t.grad_accum)]
        else:
            choices = [(remat, t.grad_accum) for remat in ("none", "dots", "block")]
            accum = t.grad_accum * 2
            while self.exp.stage != "tokenizer" and t.batch_size % (self.batch_multiple * accum) == 0:
                choices.append(("block", accum))
                accum *= 2
        tried = []
        for remat, accum in choices:
            if (remat, accum) != (self.exp.model.remat, self.exp.train.grad_accum):
                self.__init__(given.replace(runtime=dataclasses.replace(runtime, remat=remat),
                                            train=dataclasses.replace(t, grad_accum=accum)),
                              self.workdir, devices=self.devices)
            plan = self.planned_bytes()
            if plan is None or plan[0] <= plan[1]:
                break
            tried.append(f"remat {remat}" + (f" with {accum} micro-batches" if accum > 1 else "")
                         + f": {plan[0] / 2 ** 30:.2f} GiB")
        else:
            raise UserError(f"runtime.remat={runtime.remat}: the train step does not fit ("
                            + ", ".join(tried) + f"; {plan[1] / 2 ** 30:.2f} GiB available, "
                            f"{plan[1]} bytes): set a smaller train.batch_size with train.grad_accum"
                            + (", or runtime.remat=auto" if runtime.remat != "auto" else ""))
        if tried and jax.process_index() == 0:
            chosen = f"remat {remat}" + (f", train.grad_accum {accum}" if accum != t.grad_accum else "")
            print(f"runtime.remat auto: {', '.join(tried)}, more than the {plan[1] / 2 ** 30:.2f} GiB available; "
                  f"running with {chosen}: {plan[0] / 2 ** 30:.2f} GiB", flush=True)
        self.exp = self.exp.replace(runtime=dataclasses.replace(self.exp.runtime, remat=self.exp.model.remat))

    def _train(self, stop: preemption.StopAgreement, closing: contextlib.ExitStack,
               progress: bool = True) -> dict[str, float]:
        exp, t = self.exp, self.exp.train
        best_metric, higher = self.stage.best_metric(exp)
        if exp.stage == "finetune":  # before the first step, not at the first evaluation after all of training
            check_labels(exp)
        if exp.data.pack_tokens:  # a window too large for a row, found now rather than where the shuffle puts it
            from labram_jax.train.launch import check_packed_windows

            check_packed_windows(exp)
        self.workdir.mkdir(parents=True, exist_ok=True)
        ckpt = closing.enter_context(contextlib.closing(Checkpoints(self.workdir, t.keep,
                                                                    identity={"stage": exp.stage})))
        sources = {str(p): [p] for p in exp.data.train}
        iterator = iter(make_dataset(sources, self.loader_config(t.batch_size)))
        meta: dict[str, Any] = {"best": None}
        resumed = ckpt.restore_latest(self.state, self.shardings)
        layout = self.data_layout()
        if resumed is not None:
            start, self.state, data_state, meta = resumed
            saved = meta.get("data_layout", layout)  # a checkpoint from before layouts were recorded: trusted
            changed = [k for k in {**saved, **layout} if saved.get(k) != layout.get(k)]
            if not changed:
                restore_state(iterator, data_state)
            elif t.force_resume:
                print(f"resuming the weights of step {start} with another data layout ("
                      + ", ".join(f"{k} {saved.get(k)} -> {layout.get(k)}" for k in changed)
                      + "): train.force_resume starts a fresh pass of the data")
            else:
                raise UserError(
                    f"{ckpt.directory / str(start)}: its data position was saved with "
                    + ", ".join(f"{k}={saved[k]}" for k in changed if k in saved) + " but this run has "
                    + ", ".join(f"{k}={layout[k]}" for k in changed if k in layout)
                    + "; resume with the same, or set train.force_resume=true to go on from its weights with a "
                    "fresh pass of the data")
            print(f"resumed from step {start} in {ckpt.directory}")
        meta = dict(meta, data_layout=layout)
        # The logs lose what was written after the checkpoint resumed from, which the run writes again.
        logger = closing.enter_context(contextlib.closing(
            MetricLogger(self.workdir, resumed_from=None if resumed is None else start)))
        if jax.process_index() == 0:  # after the resume: a mismatched run must not overwrite the record of the first
            write_json(self.workdir / "config.json", dataclasses.asdict(exp), default=str)
        step = int(self.state["step"])
        seen = SeenCounter(meta.get("seen"))
        live = Progress(t.steps, step, t.batch_size, enabled=progress)
        logger.trackers.append(live)  # it shows the logged records and is closed with the logger
        base_rng = jax.random.wrap_key_data(np.asarray(self.state["rng"]))  # a host copy: the state is donated
        summary: dict[str, float] = {}
        if meta.pop("validate_at", None) == step and exp.data.val and step < t.steps:  # stopped while validating
            meta = self._validate(step, logger, best_metric, higher, meta, summary, seen, stop, ckpt, iterator)
        step_program = self.compiled_step()
        peak = device_peak_flops()
        flops = self.step_flops() if peak else None
        analytic = analytic_step_flops(self.exp) / jax.device_count()  # per device, as XLA's count
        tokens_per_step = t.batch_size * row_tokens(exp)[0]  # patch tokens a step computes, padding included
        last_log = time.perf_counter()
        # Steps run ahead of the host: finiteness is read at log, eval and save steps (a per-step read would
        # stall the host until the step ends), and the host loads the next batch while one step is in flight.
        unchecked: list[tuple[int, Any, dict]] = []
        in_flight: dict | None = None
        while step < t.steps:
            data_state = save_state(iterator)  # the position before this step's batch
            batch = next(iterator)
            seen.add(batch)
            batch = self.global_batch(batch)
            if in_flight is not None:
                jax.block_until_ready(in_flight)  # at most one step queued behind the running one
            self.state, m = step_program(self.state, batch, jax.random.fold_in(base_rng, step))
            in_flight = m
            step += 1
            live.advance(step)
            if not t.skip_nonfinite:
                unchecked.append((step, data_state, m))
            logs = step % t.log_every == 0 or step == t.steps
            evals = bool(t.eval_every and step % t.eval_every == 0 and exp.data.val and step < t.steps)
            saves = step % t.save_every == 0 and step < t.steps
            if logs or evals or saves:
                check_finite(unchecked)
            if logs:
                now = time.perf_counter()
                record = {k: float(v) for k, v in jax.device_get(m).items()}
                elapsed = (now - last_log) / (t.log_every if step % t.log_every == 0 else 1)
                record |= {"step_time": elapsed, "tokens_per_s": tokens_per_step / elapsed,
                           "flops_analytic": analytic}
                if peak:  # FLOPs per device over one device's peak
                    record["mfu_analytic"] = analytic / elapsed / peak
                if flops and peak:
                    record |= {"flops_xla": flops, "mfu": flops / elapsed / peak}
                record |= seen.total()
                logger.write(step, record)
                summary |= record
                last_log = now
            if evals:
                meta = self._validate(step, logger, best_metric, higher, meta, summary, seen, stop, ckpt, iterator)
            if saves:
                ckpt.save(step, self.state, save_state(iterator), meta | {"seen": seen.total()})
            ckpt.check()  # a background save that failed (a full disk) ends the run now, not after more steps
            if stop():
                check_finite(unchecked)  # never save a step whose loss or gradient was not finite
                self._preempted(step, ckpt, save_state(iterator), meta | {"seen": seen.total()})
        if exp.data.val:
            meta = self._validate(step, logger, best_metric, higher, meta, summary, seen, stop, ckpt, iterator)
        meta |= {"seen": seen.total()}
        if ckpt.latest_step() != step:
            ckpt.save(step, self.state, save_state(iterator), meta)
        if stop(final=True):  # a signal during the last step or the final validation: the rest can run later
            self._preempted(step, ckpt, save_state(iterator), meta)
        ckpt.close()
        self.export("export")
        if exp.data.test:
            summary |= self.evaluate("test", save_as="test")
            if meta.get("best") is not None:
                summary |= {f"best_{k}": v for k, v in self._best_test().items()}
            logger.write(step, {k: v for k, v in summary.items() if k.startswith(("test/", "best_test/"))})
        return summary

    def data_layout(self) -> dict[str, int]:
        """What a saved data position means: each process reads its slice [i::processes] of the shuffled windows
        in batches of batch_size / processes rows, packed as the pack_* settings say. (The device count is not
        in it: a process's batches are the same on any mesh.)"""
        d = self.exp.data
        packing = {"pack_tokens": d.pack_tokens, "pack_windows": d.pack_windows,
                   "pack_buffer": d.pack_buffer} if d.pack_tokens else {"pack_tokens": 0}
        return {"processes": jax.process_count(), "batch_size": self.exp.train.batch_size, **packing}

    def _preempted(self, step: int, ckpt: Checkpoints, data_state: Any, meta: dict) -> NoReturn:
        """Save the step reached; train()'s exit closes the checkpoints (waiting for the commit) and the logs
        before the caller reports it."""
        if ckpt.latest_step() != step:
            ckpt.save(step, self.state, data_state, meta)
        raise preemption.Preempted(f"stopped at step {step}: checkpoint {ckpt.directory / str(step)} saved; "
                                   "the same command resumes from it")

    def _validate(self, step: int, logger: MetricLogger, metric: str, higher: bool, meta: dict,
                  summary: dict, seen: SeenCounter, stop: preemption.StopAgreement, ckpt: Checkpoints,
                  iterator: Any) -> dict:
        """Score the validation split at `step`; a stop signal between its batches saves the step (marked to
        validate again on resume, so no best checkpoint is missed) and raises Preempted."""
        self._stop = stop
        try:
            result = self.evaluate("val")
            if self.exp.stage == "tokenizer":
                result |= self.train_pass()
        except EvaluationStopped:
            self._preempted(step, ckpt, save_state(iterator), meta | {"seen": seen.total(), "validate_at": step})
        finally:
            self._stop = None
        logger.write(step, result | seen.total())  # a held-out loss against the data it was trained on
        summary |= result
        value = result.get(metric)
        best = meta.get("best")
        if value is not None and (best is None or (value > best["value"] if higher else value < best["value"])):
            self.export("best")
            meta = dict(meta, best={"metric": metric, "value": value, "step": step})
        return meta

    def _best_test(self) -> dict[str, float]:
        """Test metrics of the best validation checkpoint, as the original reports them."""
        current = self.state
        best = load_model(self.workdir / "best", torch_order=False)
        params, fixed, rest = nnx.state(best, self.stage.trainable(self.exp), nnx.Param, ...)
        # Every process loaded the whole export; each fills its own devices' shards (device_put cannot place
        # host arrays on another host's devices).
        self.state = dict(current, **jax.tree.map(
            lambda placement, subtree: jax.tree.map(
                lambda leaf: jax.make_array_from_callback(np.shape(leaf), placement,
                                                          lambda index: np.asarray(leaf)[index]), subtree),
            {k: self.shardings[k] for k in ("params", "fixed", "rest")},
            {"params": params, "fixed": fixed, "rest": rest}))
        try:
            return self.evaluate("test", save_as="best_test")
        finally:
            self.state = current

    # -- cost ---------------------------------------------------------------------------------------------------
    def lower(self, batch: dict[str, Any] | None = None) -> Any:
        """The train step lowered for this run's state and `batch`'s shapes (default: the pipeline's batch)."""
        batch = self.abstract_batch() if batch is None else jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=self.batch_sharding), batch)
        rng = jax.eval_shape(lambda: jax.random.key(0))
        return self._step.lower(self.state, batch, rng)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        b, d = self.exp.train.batch_size, self.exp.data
        n, a = d.max_channels, d.max_patches
        if d.pack_tokens:  # labram_jax.data.pipeline's packed rows
            t, w = d.pack_tokens, d.pack_windows
            shapes = {"x": ((b, t, 200), jnp.float32), "segments": ((b, t), jnp.int32), "mask": ((b, t), jnp.bool_),
                      "token_channels": ((b, t), jnp.int32), "token_times": ((b, t), jnp.int32),
                      "label": ((b, w), jnp.int32), "target": ((b, w), jnp.float32),
                      "dataset": ((b, w), jnp.int32), "valid": ((b, w), jnp.bool_)}
            return {k: jax.ShapeDtypeStruct(s, dt, sharding=self.batch_sharding) for k, (s, dt) in shapes.items()}
        shapes = {"x": ((b, n, a, 200), jnp.float32), "input_chans": ((b, n + 1), jnp.int32),
                  "mask": ((b, n, a), jnp.bool_), "token_channels": ((b, n * a), jnp.int32),
                  "token_times": ((b, n * a), jnp.int32), "label": ((b,), jnp.int32), "target": ((b,), jnp.float32),
                  "dataset": ((b,), jnp.int32), "valid": ((b,), jnp.bool_)}
        return {k: jax.ShapeDtypeStruct(s, dt, sharding=self.batch_sharding) for k, (s, dt) in shapes.items()}

    def compiled_step(self, batch: dict[str, Any] | None = None) -> Any:
        """The train step compiled for this run's state and batch shapes, once: the loop runs it and step_flops
        reads its cost, so a run that reports MFU does not compile its step twice (minutes for a pod model).

        `batch`: compile for that batch's fields and shapes instead (not cached), e.g. one carrying the
        pretraining mask in `bool_masked_pos`."""
        if batch is not None:
            return self.lower(batch).compile()
        if self._compiled is None:
            step = self._stored and self._stored.result()
            if step is not None and not self._takes(step):
                print("warning: the stored train step does not take this run's state (another layout); compiling "
                      "it again", file=sys.stderr)
                step = None
            if step is None:
                compile = lambda: self.lower().compile()  # noqa: E731
                step = compile_cache.store_step(self._step_key, compile) if self._step_key else compile()
            self._compiled = step
        return self._compiled

    def _step_parts(self) -> dict[str, Any]:
        """What decides the train step's program besides labram_jax's code and JAX's environment
        (compile_cache.step_key), known before the model is built: the resolved experiment (the models are built
        from it) less NOT_IN_THE_STEP, the pretraining tokenizer's config (its checkpoint brings its own), the files
        that define the stage's functions, the batch's layout and the mesh. Whatever the step reads from `self`
        derives from these; the state's layout is checked against a stored step when it is used (_takes)."""
        stage_code = [fn for fn in vars(self.stage).values() if callable(fn)]  # a stage registered from outside
        tokenizer = self.exp.tokenizer_checkpoint and self._tokenizer_identity()
        experiment = dataclasses.asdict(self.exp)
        for name in NOT_IN_THE_STEP:
            *groups, key = name.split(".")
            functools.reduce(dict.__getitem__, groups, experiment).pop(key)
        return {"experiment": experiment, "tokenizer": tokenizer,
                "stage": compile_cache.code_of(*stage_code), "batch": _layout(self.abstract_batch()),
                "mesh": [dict(self.mesh.shape), [d.id for d in self.mesh.devices.flat]]}

    def _tokenizer_identity(self) -> Any:
        """The pretraining tokenizer as its program depends on it, before it loads: an export's config with this
        run's runtime settings, else the checkpoint file's path, size and modification time (a .pth's config
        comes from its shapes, which takes reading it)."""
        path = Path(self.exp.tokenizer_checkpoint)
        try:
            if path.is_dir():
                return dataclasses.asdict(model_config(path, runtime_of(self.exp.tokenizer)))
            stat = path.stat()
        except (UserError, OSError):  # the load reports it
            return str(path)
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]

    def _takes(self, step: Any) -> bool:
        """Whether a compiled step takes this trainer's state and batch as they are: the same tree (Variable types
        and metadata included), shapes, dtypes and shardings."""
        args = (self.state, self.abstract_batch())
        leaves, tree = jax.tree_util.tree_flatten(args)
        try:
            infos = tree.flatten_up_to(step.args_info[0][:2])
            shardings = tree.flatten_up_to(step.input_shardings[0][:2])
        except (ValueError, TypeError):
            return False
        # an input the step does not read (a batch field of another stage) has no sharding
        return all(a.shape == i.shape and a.dtype == i.dtype
                   and (s is None or s.is_equivalent_to(a.sharding, len(a.shape)))
                   for a, i, s in zip(leaves, infos, shardings))

    def step_flops(self) -> float | None:
        """FLOPs of one step per device, from XLA's cost analysis of the compiled step (None under scan_blocks:
        XLA counts a loop's body once, not once per block)."""
        if self.exp.runtime.scan_blocks:
            return None
        compiled = self.compiled_step()  # a step that does not compile fails the run here, not as "no FLOPs"
        try:
            cost = compiled.cost_analysis()
        except Exception:  # noqa: BLE001 - cost analysis is best-effort and backend dependent
            return None
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
