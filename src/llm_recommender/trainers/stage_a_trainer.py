"""The one Stage A training loop.

AdamW (SparseAdam for sparse ID tables) with warmup + cosine/linear decay, gradient clipping
and accumulation, bf16 autocast on CUDA, validation every epoch through the evaluator,
early stopping on validation NDCG@10, ``best_model/`` and ``last/`` checkpoints, exact
``--resume``, and multi-process data parallelism through Hugging Face Accelerate (DDP):
launch with ``accelerate launch`` or ``torchrun``; each process takes its slice of every
global batch, so N processes with batch B see the same examples as 1 process with N x B.
``runtime.fsdp: true`` shards weights, gradients and optimizer state instead (PyTorch FSDP2,
applied here rather than by Accelerate, which does not run FSDP on CPU); see
:meth:`StageATrainer._shard`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import (
    flatten_state,
    load_training_state,
    read_checkpoint_info,
    save_checkpoint,
    unflatten_state,
)
from ..config import Config, EvaluationConfig
from ..data.dataset import ProcessedData, TrainWindows, epoch_batches, num_batches
from ..errors import ConfigError, TrainingError
from ..io_utils import atomic_write_text, clean_stale_temporaries

LOSS_TERMS = ("loss", "cross_entropy", "context_bpr", "user_bpr", "l2", "contrastive")
TRAIN_STATE_VERSION = 1


# ------------------------------------------------------------------------------ set-up helpers


def set_seed(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's legacy global RNG."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def configure_runtime(config: Config) -> None:
    """Threads and determinism from ``runtime.*``."""
    if config.runtime.num_threads is not None:
        torch.set_num_threads(config.runtime.num_threads)
    if config.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_mixed_precision(config: Config, device_type: str) -> str:
    mode = config.stage_a.mixed_precision
    if mode == "auto":
        return "bf16" if device_type == "cuda" else "no"
    if mode != "no" and device_type != "cuda":
        raise ConfigError(
            f"stage_a.mixed_precision={mode!r} needs a CUDA device (bf16 on CPU is 6-50x slower); use auto or no"
        )
    return mode


class LossModule(torch.nn.Module):
    """Wraps the model so that the loss is computed inside ``forward`` (DDP syncs gradients
    only for computations that go through the wrapped module's forward)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model.calculate_loss(batch)


def _is_table(name: str) -> bool:
    return "user_embeddings" in name or "item_embeddings" in name


def build_optimizers(model: torch.nn.Module, config: Config) -> list[torch.optim.Optimizer]:
    """AdamW over dense parameters (decay on matrices only), SparseAdam for sparse tables.

    Norm weights, biases and the ID tables get no weight decay (the tables get
    ``stage_a.embedding_weight_decay``; ``embeddings.lambda_c`` is the spec's L2 term).
    """
    cfg = config.stage_a
    decay, no_decay, tables, sparse_tables = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_table(name):
            (sparse_tables if config.embeddings.sparse else tables).append(param)
        elif param.ndim >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": tables, "weight_decay": cfg.embedding_weight_decay},
    ]
    groups = [g for g in groups if g["params"]]
    optimizers: list[torch.optim.Optimizer] = []
    if groups:
        # The fused kernel (CPU and CUDA) is ~10x faster than the default per-tensor loop on CPU
        # (1.5 vs 15.8 ms per step for the Beauty tables, benchmarks/train_throughput.py).
        params = [p for g in groups for p in g["params"]]
        fused = all(
            p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point and type(p.data) is torch.Tensor
            for p in params
        )  # not for FSDP's sharded DTensors
        optimizers.append(
            torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), eps=1e-8, fused=fused or None)
        )
    if sparse_tables:
        optimizers.append(torch.optim.SparseAdam(sparse_tables, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas)))
    return optimizers


def lr_multiplier(step: int, total_steps: int, config: Config) -> float:
    """Linear warmup, then cosine / linear decay to ``min_lr_ratio`` (or constant)."""
    cfg = config.stage_a
    warmup = int(round(cfg.warmup_ratio * total_steps))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant" or total_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = cfg.min_lr_ratio
    if cfg.lr_schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------ the loop


class StageATrainer:
    """Trains a ``StageAModel`` on a processed dataset; see :func:`train_stage_a`.

    Args:
        config: the resolved config.
        data_dir: processed data folder.
        output_dir: where ``best_model/``, ``last/``, ``metrics.jsonl`` and plots go.
        accelerator: an ``accelerate.Accelerator`` (one is made when None).
        train_through: ``valid`` trains on training + validation events without validating
            (the refit of ``stage_a.refit_on_valid``).
        stop_after_epochs: stop after this many epochs (the refit's length); the learning-rate
            schedule still spans ``stage_a.epochs``, as in the run it repeats.
        lr_decay_epochs: the refit replays the plateau decays (``stage_a.lr_decay_patience``)
            of the run it repeats: after each epoch listed, the learning rate is decayed.
        order_check: the refit takes the validated run's :func:`order_strength` answer
            (``stage_a.window_reversal: weak_order``) instead of measuring it again.
    """

    def __init__(
        self,
        config: Config,
        data_dir: Path,
        output_dir: Path,
        accelerator=None,
        train_through: str = "train",
        stop_after_epochs: int | None = None,
        lr_decay_epochs: list[int] | None = None,
        order_check: dict[str, Any] | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.config = config
        self.data_dir = Path(data_dir)
        self.output_dir = Path(output_dir)
        configure_runtime(config)
        device_type = self._device_type(config.runtime.device)
        self.accelerator = accelerator or Accelerator(
            cpu=device_type == "cpu",
            mixed_precision=resolve_mixed_precision(config, device_type),
        )
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.device = self.accelerator.device
        engine = self.accelerator.distributed_type.name
        if engine in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise ConfigError(
                f"the Accelerate config selects {engine}; launch with plain multi-process "
                "(accelerate launch --multi_gpu, or torchrun) and set runtime.fsdp=true to shard"
            )
        self.fsdp = config.runtime.fsdp and self.world > 1
        if config.embeddings.sparse and self.world > 1:
            raise ConfigError(
                "embeddings.sparse=true is single-process only (DDP all-reduces dense gradients); "
                "use sampled cross-entropy (stage_a.ce.mode=sampled) for multi-process runs"
            )

        self.data = ProcessedData(self.data_dir, train_through=train_through)
        self.refit = train_through != "train"
        self.stop_after_epochs = stop_after_epochs
        self.replayed_decays = sorted(lr_decay_epochs or [])
        self.lr_decay_epochs: list[int] = []  # epochs after which the learning rate was decayed
        reversal_prob = config.stage_a.window_reversal_prob
        self.order_check: dict[str, Any] | None = None
        if reversal_prob > 0 and config.stage_a.window_reversal == "weak_order":
            # The refit is handed the validated run's answer; several processes compute it once.
            self.order_check = order_check
            if self.order_check is None:
                if self.is_main:  # on training events only, whatever this run trains on
                    self.order_check = order_strength(config, ProcessedData(self.data_dir) if self.refit else self.data)
                else:
                    self.order_check = {}
                if self.world > 1:
                    from accelerate.utils import broadcast_object_list

                    self.order_check = broadcast_object_list([self.order_check])[0]
            if not self.order_check["weak"]:
                reversal_prob = 0.0
        self.reversal_prob = reversal_prob
        self.windows = TrainWindows(
            self.data,
            config.model.max_seq_len,
            config.model.use_user_token,
            config.stage_a.windows_per_user,
            shuffle_ties=config.stage_a.shuffle_tied_events,
            deletion_prob=config.stage_a.item_deletion_prob,
            substitution_prob=config.stage_a.item_substitution_prob,
            reversal_prob=reversal_prob,
            tie_groups=config.stage_a.ce.tied_targets,
            reversal_flags=config.model.direction_token,
            same_target_positives=(
                config.stage_a.loss_weights.contrastive > 0 and config.stage_a.contrastive_positive == "same_target"
            ),
        )
        self.global_batch = config.stage_a.batch_size * self.world
        targets_per_window = self.windows.expected_targets  # (windows,)
        # stage_a.loss_average=epoch: a global batch's expected number of target positions.
        self.positions_per_batch = float(targets_per_window.mean()) * self.global_batch
        self.batches_per_epoch = num_batches(len(self.windows), self.global_batch, config.stage_a.last_batch == "fill")
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"stage_a.batch_size={config.stage_a.batch_size} x {self.world} process(es) exceeds the "
                f"{len(self.windows)} training windows, and stage_a.last_batch=drop would skip them all; "
                "lower stage_a.batch_size or set stage_a.last_batch: fill"
            )
        accumulation = config.stage_a.gradient_accumulation_steps
        self.steps_per_epoch = max(1, self.batches_per_epoch // accumulation)
        self.total_steps = self.steps_per_epoch * config.stage_a.epochs
        if config.stage_a.max_steps is not None:
            self.total_steps = min(self.total_steps, config.stage_a.max_steps)
        # Validation cadence in epochs: eval_every_epochs, rounded up to a multiple spanning at
        # least eval_min_steps optimizer steps (a function of config and data: resume-safe).
        every = config.stage_a.eval_every_epochs
        spans = -(-config.stage_a.eval_min_steps // self.steps_per_epoch)  # epochs for eval_min_steps
        self.eval_every_epochs = every * max(1, -(-spans // every))

        set_seed(config.stage_a.seed)
        from ..models.stage_a_model import StageAModel

        self.model = StageAModel(config, self.data.num_users, self.data.num_items)
        if config.stage_a.ce.mode == "sampled" and config.stage_a.ce.proposal == "popularity":
            self.model.set_item_sampling_distribution(torch.from_numpy(self.data.item_popularity()))
        if config.model.item_bias_init == "log_popularity":  # (the config check requires item_bias)
            # Counts of the events this run trains on (a refit's include the validation events);
            # --resume then loads the trained bias over it.
            self.model.init_item_bias(torch.from_numpy(self.data.item_popularity()))
        self.model.to(self.device)
        self.replica: torch.nn.Module | None = None  # FSDP: rank 0's unsharded copy
        self._pending_state: tuple[list[dict], list[dict]] | None = None
        if self.fsdp:  # (sparse tables were refused above for any multi-process run)
            # Sharded in fit(), after --resume has loaded the weights into the whole model.
            self.optimizers, self.schedulers = [], []
            self.wrapped = LossModule(self.model)
        else:
            self._build_optimizers()
            self.wrapped = self.accelerator.prepare(LossModule(self.model))

        # stage_a.ema_decay: the averaged copy of every trainable weight (fp32, same device).
        self.ema: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = []
        if config.stage_a.ema_decay is not None:
            if self.fsdp:
                raise ConfigError("stage_a.ema_decay is not supported with runtime.fsdp=true (sharded weights)")
            self.ema = [
                (name, p, p.detach().float().clone())
                for name, p in self.model.named_parameters()
                if p.requires_grad
            ]

        # Loop state (restored by --resume).
        self.epoch = 0
        self.step_in_epoch = 0  # optimizer steps done in the current epoch
        self.global_step = 0
        self.best_metric = -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        self.stopped_reason = ""
        self.train_seconds = 0.0

    def _build_optimizers(self) -> None:
        self.optimizers = build_optimizers(self.model, self.config)
        if not self.optimizers:
            raise ConfigError("nothing to train: every parameter is frozen")
        decay = self.config.stage_a.lr_decay_factor
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(
                opt,
                lambda step: lr_multiplier(step, self.total_steps, self.config) * decay ** len(self.lr_decay_epochs),
            )
            for opt in self.optimizers
        ]

    # ------------------------------------------------------------------ FSDP

    def _shard(self) -> None:
        """FSDP2: one unit per decoder layer, the rest (tables, projections, norms) in the root.

        The root is the loss wrapper, so every use of the tables (inputs, scoring, BPR) happens
        inside its forward. Rank 0 keeps an unsharded CPU copy, refreshed after every epoch, for
        validation and checkpoints (which therefore look exactly as in a single-process run).
        """
        from torch.distributed.fsdp import fully_shard

        if self.is_main:
            self.replica = copy.deepcopy(self.model).to("cpu").eval()
        unit_names = set()
        for module in self.model.backbone.modules():
            unit_names.update(getattr(module, "_no_split_modules", None) or [])
        units = [m for m in self.model.backbone.modules() if type(m).__name__ in unit_names]
        if not units:
            raise ConfigError(
                f"runtime.fsdp=true: no decoder layer class found in {type(self.model.backbone).__name__} "
                "(its _no_split_modules is empty)"
            )
        for unit in units:
            fully_shard(unit)
        fully_shard(self.wrapped)
        self._build_optimizers()
        if self._pending_state is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            optimizer_states, scheduler_states = self._pending_state
            for opt, payload in zip(self.optimizers, optimizer_states):
                set_optimizer_state_dict(self.wrapped, opt, payload, options=StateDictOptions(full_state_dict=True))
            for sched, payload in zip(self.schedulers, scheduler_states):
                sched.load_state_dict(payload)
            self._pending_state = None

    def _sync_replica(self) -> None:
        """FSDP (collective): gather the full weights into rank 0's copy."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            self.replica.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})

    def _optimizer_states(self) -> list[dict]:
        """Optimizer states to checkpoint (FSDP: gathered whole on rank 0, collective)."""
        if not self.fsdp:
            return [o.state_dict() for o in self.optimizers]
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return [get_optimizer_state_dict(self.wrapped, o, options=options) for o in self.optimizers]

    def _eval_model(self) -> torch.nn.Module:
        return self.replica if self.fsdp else self.accelerator.unwrap_model(self.wrapped).model

    @staticmethod
    def _device_type(device: str) -> str:
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"runtime.device={device!r} but no CUDA device is available")
        return "cuda" if device.startswith("cuda") else "cpu"

    # ------------------------------------------------------------------ state for --resume

    def _rng_states(self) -> list[dict[str, torch.Tensor]]:
        """Every process's RNG states, CPU and its CUDA device (collective when several
        processes: dropout draws differ per rank, and an exact --resume needs each one's)."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world == 1:
            return [state]
        from accelerate.utils import gather_object

        return gather_object([state])

    def _training_state(
        self, optimizer_states: list[dict], rng_states: list[dict[str, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        state = {
            "version": TRAIN_STATE_VERSION,
            "fsdp": self.fsdp,
            "optimizers": [flatten_state(f"opt{i}", o, tensors) for i, o in enumerate(optimizer_states)],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric if math.isfinite(self.best_metric) else None,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "lr_decay_epochs": self.lr_decay_epochs,
            "history": self.history,
            "stopped_reason": self.stopped_reason,
            "train_seconds": self.train_seconds,
            "world_size": self.world,
        }
        for name, _, average in self.ema:
            tensors["ema." + name] = average.detach().cpu()
        for rank, states in enumerate(rng_states):
            suffix = "" if rank == 0 else f".rank{rank}"
            tensors["rng.torch" + suffix] = states["cpu"]
            if "cuda" in states:
                tensors["rng.cuda" + suffix] = states["cuda"]
        return tensors, state

    def resume(self) -> None:
        """Restore model, optimizers, schedulers, RNG and counters from ``output_dir/last``."""
        from ..checkpoint import MODEL_FILE
        from safetensors.torch import load_file

        last = self.output_dir / "last"
        read_checkpoint_info(last, verify=True)
        tensors, state = load_training_state(last)
        if state.get("version") != TRAIN_STATE_VERSION:
            raise TrainingError(f"{last}: training state version {state.get('version')!r} is not {TRAIN_STATE_VERSION}")
        if state.get("world_size", 1) != self.world:
            raise TrainingError(
                f"{last}: saved with {state.get('world_size')} processes, resuming with {self.world}; "
                "resume with the same number of processes"
            )
        if bool(state.get("fsdp", False)) != self.fsdp:
            raise TrainingError(f"{last}: saved with runtime.fsdp={state.get('fsdp', False)}; resume with the same")
        self.model.load_trainable_state_dict(load_file(str(last / MODEL_FILE)))
        if self.ema:
            if any("ema." + name not in tensors for name, _, _ in self.ema):
                raise TrainingError(
                    f"{last}: saved without stage_a.ema_decay (no averaged weights); resume with the same setting"
                )
            for name, _, average in self.ema:
                average.copy_(tensors["ema." + name])
        optimizer_states = [unflatten_state(payload, tensors) for payload in state["optimizers"]]
        if self.fsdp:  # loaded into the sharded optimizers by _shard()
            self._pending_state = (optimizer_states, state["schedulers"])
        else:
            for opt, payload in zip(self.optimizers, optimizer_states):
                opt.load_state_dict(payload)
            for sched, payload in zip(self.schedulers, state["schedulers"]):
                sched.load_state_dict(payload)
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.best_metric = state["best_metric"] if state["best_metric"] is not None else -math.inf
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]
        self.lr_decay_epochs = list(state.get("lr_decay_epochs", []))
        self.history = state["history"]
        self.stopped_reason = state.get("stopped_reason", "")
        self.train_seconds = state.get("train_seconds", 0.0)
        suffix = "" if self.rank == 0 else f".rank{self.rank}"
        torch.set_rng_state(tensors.get("rng.torch" + suffix, tensors["rng.torch"]))
        if self.device.type == "cuda" and "rng.cuda" + suffix in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda" + suffix], self.device)
        self._rewrite_metrics_log()

    def _save(self, name: str, metrics: dict[str, Any] | None, with_state: bool) -> None:
        optimizer_states = self._optimizer_states() if with_state and (self.fsdp or self.is_main) else None
        rng_states = self._rng_states() if with_state else None
        if not self.is_main:
            return
        info = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "metrics": metrics or {},
            "best_epoch": self.best_epoch,
            "trained_on": "train+valid" if self.refit else "train",
        }
        # last/ resumes training: the training weights (the averages travel in its state);
        # best_model/ is the model that was validated: the averages.
        averaged = contextlib.nullcontext() if with_state else self._averaged_weights()
        with averaged:
            save_checkpoint(
                self.output_dir / name,
                self._eval_model(),
                self.config,
                info,
                self.data_dir,
                training_state=self._training_state(optimizer_states, rng_states) if with_state else None,
                data_fingerprint=self.data.fingerprint,
            )

    # ------------------------------------------------------------------ logging

    def _metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def _rewrite_metrics_log(self) -> None:
        """metrics.jsonl holds exactly the history of the state we are at (after a resume,
        entries a killed run wrote past its last checkpoint are dropped)."""
        if self.is_main:
            text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in self.history)
            atomic_write_text(self._metrics_path(), text)

    def _log(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if self.is_main:
            with open(self._metrics_path(), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
            if self.tb is not None:
                for key, value in entry.items():
                    if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                        self.tb.add_scalar(f"{entry['kind']}/{key}", value, entry["step"])

    def _open_tensorboard(self):
        if not self.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))

    # ------------------------------------------------------------------ one epoch

    def _batch_tensors(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        # (model.unknown_user_prob is applied inside the model's loss, from torch's RNG.)
        batch = self.windows.batch(indices)
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in batch.items()}

    def _micro_batches(self, epoch: int) -> list[np.ndarray]:
        cfg = self.config.stage_a
        global_batches = epoch_batches(
            self.windows.lengths,
            self.global_batch,
            cfg.seed,
            epoch,
            cfg.length_bucketing,
            fill_last=cfg.last_batch == "fill",
        )
        size = cfg.batch_size
        # Each process takes its slice of every global batch: N processes x batch B see the
        # examples 1 process with batch N x B sees.
        return [batch[self.rank * size : (self.rank + 1) * size] for batch in global_batches]

    def _position_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """Weight of this process's loss (a mean over its own target positions).

        ``stage_a.loss_average=batch``: DDP's gradient average then equals the gradient of the
        mean over all processes' positions (processes hold different numbers of them).
        ``epoch``: the sum over all processes' positions divided by the epoch's average
        positions per global batch, so that every position weighs the same in every batch.
        """
        local = (batch["targets"] != 0).sum().to(torch.float64)
        if self.config.stage_a.loss_average == "epoch":
            return float(local) * self.world / self.positions_per_batch
        if self.world == 1:
            return 1.0
        total = self.accelerator.reduce(local.clone(), reduction="sum")
        return float(local * self.world / total.clamp_min(1))

    def _optimizer_step(self) -> float | None:
        grad_norm = None
        max_norm = self.config.stage_a.max_grad_norm
        if max_norm is not None:
            dense = [p for p in self.model.parameters() if p.grad is not None and not p.grad.is_sparse]
            if dense:
                norm = torch.nn.utils.clip_grad_norm_(dense, max_norm)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        for opt in self.optimizers:
            opt.step()
        for sched in self.schedulers:
            sched.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.ema:
            t = self.global_step  # steps done before this one
            weight = 1.0 - min(self.config.stage_a.ema_decay, (1.0 + t) / (10.0 + t))
            with torch.no_grad():
                for _, param, average in self.ema:
                    average.lerp_(param.detach().float(), weight)
        return grad_norm

    @contextlib.contextmanager
    def _averaged_weights(self):
        """With ``stage_a.ema_decay``: the model holds the averaged weights inside the block
        (validation, ``best_model/``), its training weights again after it."""
        if not self.ema:
            yield
            return
        saved = []
        with torch.no_grad():
            for _, param, average in self.ema:
                saved.append(param.detach().clone())
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, param, _), raw in zip(self.ema, saved):
                    param.copy_(raw)

    def _train_epoch(self, epoch: int, deadline: float | None, progress) -> dict[str, float]:
        cfg = self.config.stage_a
        accumulation = cfg.gradient_accumulation_steps
        micro = self._micro_batches(epoch)
        self.windows.set_epoch(cfg.seed, epoch)
        totals = {term: 0.0 for term in LOSS_TERMS}
        window = {term: 0.0 for term in LOSS_TERMS}
        counted = window_count = 0
        window_start = time.perf_counter()
        self.wrapped.train()
        first = self.step_in_epoch * accumulation
        for index in range(first, self.steps_per_epoch * accumulation):
            step_index = index // accumulation
            last_micro = (index + 1) % accumulation == 0
            batch = self._batch_tensors(micro[index])
            if self.fsdp:
                self.wrapped.set_requires_gradient_sync(last_micro)
                sync = nullcontext()
            else:
                sync = nullcontext() if last_micro else self.accelerator.no_sync(self.wrapped)
            scale = self._position_weight(batch) / accumulation
            with sync, self.accelerator.autocast():
                losses = self.wrapped(batch)
                self.accelerator.backward(losses["loss"] * scale)
            values = {term: float(losses[term].detach()) for term in LOSS_TERMS if term in losses}
            if not all(math.isfinite(v) for v in values.values()):
                parts = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                raise TrainingError(
                    f"non-finite loss at epoch {epoch + 1} step {self.global_step + 1} ({parts}); "
                    f"stopped, the last good checkpoint is {self.output_dir / 'last'} "
                    "(lower stage_a.learning_rate or set stage_a.max_grad_norm)"
                )
            for term, value in values.items():
                totals[term] += value
                window[term] += value
            counted += 1
            window_count += 1
            if not last_micro:
                continue
            self._optimizer_step()
            self.global_step += 1
            self.step_in_epoch = step_index + 1
            if progress is not None:
                progress.update(1)
            if self.global_step % cfg.log_every_steps == 0 or self.step_in_epoch == self.steps_per_epoch:
                elapsed = max(1e-9, time.perf_counter() - window_start)
                seqs = window_count * cfg.batch_size * self.world / elapsed
                entry = {"kind": "train", "epoch": epoch + 1, "step": self.global_step,
                         "lr": self.schedulers[0].optimizer.param_groups[0]["lr"], "sequences_per_s": round(seqs, 1)}
                entry.update({k: window[k] / window_count for k in window if k in values})
                self._log(entry)
                if progress is not None:
                    progress.set_postfix(loss=f"{entry['loss']:.4f}", seq_s=f"{seqs:.0f}")
                window = {term: 0.0 for term in LOSS_TERMS}
                window_count = 0
                window_start = time.perf_counter()
            if self.global_step >= self.total_steps:
                break
            if deadline is not None and time.time() > deadline:
                self.stopped_reason = "max_train_minutes"
                break
        return {k: v / max(1, counted) for k, v in totals.items()}

    # ------------------------------------------------------------------ validation

    def validate(self) -> dict[str, Any]:
        """Validation metrics (on the main process) of the current model."""
        from ..evaluation.evaluator import evaluate

        cfg = self.config.stage_a
        model = self._eval_model()
        with self._averaged_weights():
            result = evaluate(
                model,
                self.data,
                "valid",
                validation_evaluation(self.config),
                self.config.model.max_seq_len,
                protocols=(cfg.eval_protocol,),
                max_users=cfg.eval_max_users,
                device=self.device,
            )
        return result

    # ------------------------------------------------------------------ run

    def fit(self) -> dict[str, Any]:
        cfg = self.config.stage_a
        from tqdm.auto import tqdm

        if self.fsdp and not self.optimizers:
            self._shard()
        self.tb = self._open_tensorboard()
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not self.history:
                atomic_write_text(self._metrics_path(), "")
            self._print_header()
        progress = None
        if self.is_main:
            progress = tqdm(total=self.total_steps, initial=self.global_step, desc="train",
                            unit="step", dynamic_ncols=True, file=sys.stderr,
                            disable=not sys.stderr.isatty() and os.environ.get("LLMREC_PROGRESS") != "1")
        started = time.time()
        budget = cfg.max_train_minutes
        deadline = started + budget * 60 - self.train_seconds if budget is not None else None
        patience_spent = f"early stopping: no better validation NDCG@10 for {cfg.patience} validations"
        if cfg.patience and self.bad_epochs >= cfg.patience:  # a resumed run that had stopped
            self.stopped_reason = patience_spent
        try:
            while (
                self.epoch < cfg.epochs
                and (self.stop_after_epochs is None or self.epoch < self.stop_after_epochs)
                and self.global_step < self.total_steps
                and self.stopped_reason in ("", None)
            ):
                epoch_start = time.perf_counter()
                train_losses = self._train_epoch(self.epoch, deadline, progress)
                epoch_seconds = time.perf_counter() - epoch_start
                finished_epoch = self.step_in_epoch >= self.steps_per_epoch
                validate_now = not self.refit and (
                    (self.epoch + 1) % self.eval_every_epochs == 0
                    or not finished_epoch
                    or self.global_step >= self.total_steps
                    or self.epoch + 1 >= cfg.epochs
                )
                self.train_seconds += epoch_seconds
                if self.fsdp:
                    self._sync_replica()
                metrics: dict[str, Any] = {}
                improved = False
                if validate_now:
                    metrics = self._validate_and_track()
                    improved = metrics.pop("_improved")
                if finished_epoch:
                    self.epoch += 1
                    self.step_in_epoch = 0
                    if self.epoch in self.replayed_decays:
                        self._decay_lr()
                self._log_epoch(train_losses, metrics, epoch_seconds)
                if improved:
                    self._save("best_model", metrics, with_state=False)
                self._save("last", metrics, with_state=True)
                if cfg.patience and self.bad_epochs >= cfg.patience:
                    self.stopped_reason = patience_spent
                self.accelerator.wait_for_everyone()
        finally:
            if progress is not None:
                progress.close()
            if self.tb is not None:
                self.tb.close()
        if not self.stopped_reason:
            if self.stop_after_epochs is not None and self.epoch >= self.stop_after_epochs:
                self.stopped_reason = f"refit: {self.stop_after_epochs} epochs, as many as the validated run's best"
            else:
                self.stopped_reason = "epochs" if self.epoch >= cfg.epochs else "max_steps"
        if self.refit:
            # Nothing to select on (validation events are training events here): the model
            # after its last epoch is the result.
            self.best_epoch = self.epoch
            self._save("best_model", {}, with_state=False)
        summary = {
            **({"window_reversal": {**self.order_check, "prob": self.reversal_prob}} if self.order_check else {}),
            "best_epoch": self.best_epoch,
            "best_valid_ndcg10": self.best_metric,
            "epochs": self.epoch,
            "global_step": self.global_step,
            "stopped": self.stopped_reason,
            "lr_decay_epochs": self.lr_decay_epochs,
            "train_seconds": round(self.train_seconds, 1),
            "best_model": str(self.output_dir / "best_model"),
        }
        if self.is_main and self.refit:
            print(f"refit done: {self.stopped_reason}; checkpoint {self.output_dir / 'best_model'}", flush=True)
        elif self.is_main:
            self._plot_curves()
            print(f"done: {self.stopped_reason}; best validation NDCG@10 {self.best_metric:.4f} at epoch "
                  f"{self.best_epoch}; checkpoint {self.output_dir / 'best_model'}", flush=True)
        return summary

    def _validate_and_track(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if self.is_main:
            result = self.validate()
        from accelerate.utils import broadcast_object_list

        payload = broadcast_object_list([result])[0] if self.world > 1 else result
        protocol = self.config.stage_a.eval_protocol
        metrics = dict(payload.get(protocol, {}))
        # Quality figures only: timings differ between otherwise identical runs.
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "second" not in k}
        metrics["protocol"] = protocol
        score = float(metrics.get("NDCG@10", -math.inf))
        improved = score > self.best_metric
        if improved:
            self.best_metric = score
            self.best_epoch = self.epoch + 1
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
            every = self.config.stage_a.lr_decay_patience
            if every and self.bad_epochs % every == 0 and self.bad_epochs < self.config.stage_a.patience:
                self._decay_lr()
        metrics["_improved"] = improved
        return metrics

    def _decay_lr(self) -> None:
        """Multiply the learning rate by ``stage_a.lr_decay_factor`` from the next step on
        (the scheduler's multiplier counts the decays; recorded for --resume and the refit)."""
        epoch = self.epoch + (1 if self.step_in_epoch else 0)
        self.lr_decay_epochs.append(epoch)
        for sched in self.schedulers:  # the multiplier at the current step, from the next step on
            for group, base, multiplier in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * multiplier(sched.last_epoch)
        if self.is_main:
            print(f"learning rate x{self.config.stage_a.lr_decay_factor:g} after epoch {epoch} "
                  f"(now {self.schedulers[0].optimizer.param_groups[0]['lr']:.3g})", flush=True)

    def _log_epoch(self, losses: dict[str, float], metrics: dict[str, Any], seconds: float) -> None:
        # After a full epoch self.epoch counts it; a run stopped mid-epoch reports the
        # epoch it was in.
        shown = self.epoch if self.step_in_epoch == 0 else self.epoch + 1
        entry = {"kind": "epoch", "epoch": shown, "step": self.global_step,
                 "epoch_seconds": round(seconds, 2)}
        entry.update({f"train_{k}": v for k, v in losses.items()})
        entry.update({f"valid_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        self._log(entry)
        if self.is_main:
            terms = " ".join(f"{k}={v:.4f}" for k, v in losses.items() if k != "loss")
            valid = ""
            if metrics:
                valid = " | valid " + " ".join(
                    f"{k}={metrics[k]:.4f}" for k in ("HR@10", "NDCG@10", "MRR") if k in metrics
                )
            print(f"epoch {shown:3d} step {self.global_step:6d} loss={losses['loss']:.4f} {terms}{valid}"
                  f" ({seconds:.1f}s)", flush=True)

    def _print_header(self) -> None:
        from ..models.stage_a_model import count_parameters

        counts = count_parameters(self.model)
        info = getattr(self.model, "backbone_info", {})
        tied = self.windows.num_tied_events
        if self.refit:  # a fixed length, no validation: the validation events are training events here
            length = f"{self.stop_after_epochs} epochs (the refit, no validation)"
        else:
            length = f"up to {self.config.stage_a.epochs} epochs, validation every {self.eval_every_epochs} epoch(s)"
        print(
            f"train: {self.data.num_users} users, {self.data.num_items} items, {len(self.windows)} windows"
            f"{f' ({tied:,} tied events reordered every epoch)' if tied else ''}; "
            f"backbone {info.get('family', '?')} ({info.get('source', '?')}, {self.config.model.finetune_mode}); "
            f"parameters {counts['total']:,} ({counts['trainable']:,} trainable); "
            f"{self.steps_per_epoch} steps/epoch x {length}; "
            f"{self.world} process(es) on {self.device}",
            flush=True,
        )
        if self.order_check is not None:
            both, forward = (self.order_check["item_knn_valid_ndcg10"][k] for k in ("both", "forward"))
            print(
                f"window reversal ({self.config.stage_a.window_reversal_prob:g}): "
                f"{'on' if self.reversal_prob > 0 else 'off'}: item-kNN validation NDCG@10 {both:.4f} in both orders "
                f"{'>' if both > forward else '<='} {forward:.4f} forward only",
                flush=True,
            )

    def _plot_curves(self) -> None:
        """training_curves.png: loss terms per step, validation NDCG@10/HR@10 per epoch."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        train = [e for e in self.history if e["kind"] == "train"]
        epochs = [e for e in self.history if e["kind"] == "epoch" and "valid_NDCG@10" in e]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for term in LOSS_TERMS:
            points = [(e["step"], e[term]) for e in train if term in e]
            if points and any(v != 0 for _, v in points):
                axes[0].plot(*zip(*points), label=term, marker="." if len(points) < 3 else None)
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("loss")
        axes[0].set_title("training loss terms")
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend()
        for key in ("valid_NDCG@10", "valid_HR@10"):
            points = [(e["epoch"], e[key]) for e in epochs if key in e]
            if points:
                axes[1].plot(*zip(*points), marker="o", label=key)
        axes[1].set_xlabel("epoch")
        axes[1].set_title("validation")
        if axes[1].get_legend_handles_labels()[0]:
            axes[1].legend()
        fig.tight_layout()
        tmp = self.output_dir / ".training_curves.png.tmp"
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        os.replace(tmp, self.output_dir / "training_curves.png")


def validation_evaluation(config: Config) -> EvaluationConfig:
    """The evaluation settings of every validation training does (the best epoch and the stop,
    the neighbour weight of ``validated_model``, the order-strength gate): the evaluation's own,
    with ``stage_a.eval_deletion_readings`` and ``stage_a.eval_item_readings`` readings where
    they are set."""
    changes = {}
    if config.stage_a.eval_deletion_readings is not None:
        changes["deletion_readings"] = config.stage_a.eval_deletion_readings
    if config.stage_a.eval_item_readings is not None:
        changes["item_readings"] = config.stage_a.eval_item_readings
    return dataclasses.replace(config.evaluation, **changes) if changes else config.evaluation


def order_strength(config: Config, data: ProcessedData) -> dict[str, Any]:
    """Whether a log's order says little (``stage_a.window_reversal: weak_order``): item-kNN of
    the training events (``model.item_knn``'s settings) scored on the validation split, full
    NDCG@10, counting co-occurrence in both orders and forward only. ``weak`` when both orders
    score higher. ``data``: the training events (not a refit's training + validation). A function
    of the data alone: the refit decides as the validated run did."""
    from ..evaluation.baselines import ItemKNNBaseline
    from ..evaluation.evaluator import evaluate

    scores = {}
    for direction in ("both", "forward"):
        knn = ItemKNNBaseline(data, settings=dataclasses.replace(config.model.item_knn, direction=direction))
        result = evaluate(knn, data, "valid", validation_evaluation(config), config.model.max_seq_len,
                          protocols=("full",), max_users=config.stage_a.eval_max_users, cache_candidates=False)
        scores[direction] = float(result["full"]["NDCG@10"])
    return {"item_knn_valid_ndcg10": scores, "weak": scores["both"] > scores["forward"]}


def train_stage_a(config: Config, data_dir: Path, output_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train Stage A (the spec's ``scripts/train_stage_a.py``).

    With ``stage_a.refit_on_valid`` or ``model.item_knn.enabled`` the run has more stages
    (each printed): the validated run (early stopping on validation) is kept as
    ``validated_model/``, with the neighbour table of training events and its fusion weight
    tuned on validation; then the refit on training + validation events (``refit/``); then
    ``best_model/`` = the final model, whose neighbour table counts validation events too.
    ``--resume`` continues whichever stage was interrupted.

    Args:
        config: resolved config.
        data_dir: processed data folder (``llmrec preprocess``).
        output_dir: checkpoint folder; ``best_model/`` and ``last/`` are written inside.
        resume: continue from ``output_dir/last`` (optimizer, scheduler, RNG, data order).
    """
    output_dir = Path(output_dir)
    staged = config.stage_a.refit_on_valid or config.model.item_knn.enabled
    validated = output_dir / VALIDATED_MODEL
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        # A kill during a checkpoint write may have left only the previous folder, renamed
        # aside: put it back before deciding whether there is something to resume.
        for name in ("last", "best_model", VALIDATED_MODEL):
            clean_stale_temporaries(output_dir, name)
        clean_stale_temporaries(output_dir / REFIT_DIR, "last")
    validated_done = staged and (validated / "checkpoint.json").is_file()
    if resume and not validated_done and not (output_dir / "last" / "checkpoint.json").is_file():
        raise TrainingError(f"{output_dir / 'last'}: nothing to resume from (no checkpoint there)")
    if not resume and main_process:
        if (output_dir / "last" / "checkpoint.json").is_file():
            print(f"note: {output_dir} holds a previous run; starting over (use --resume to continue it)",
                  file=sys.stderr)
        for stale in (validated, output_dir / REFIT_DIR):  # stages of an earlier run
            if stale.exists():
                shutil.rmtree(stale)
    accelerator = None
    if resume and validated_done:
        summary = json.loads((validated / "checkpoint.json").read_text(encoding="utf-8")).get("summary", {})
        print(f"resume: the validated run is complete ({validated}); continuing after it", flush=True)
    else:
        trainer = StageATrainer(config, data_dir, output_dir)
        if resume:
            trainer.resume()
        elif trainer.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
        summary = trainer.fit()
        accelerator = trainer.accelerator
        if not staged:
            return summary
        if trainer.is_main:
            _save_validated_model(config, Path(data_dir), output_dir, summary)
        trainer.accelerator.wait_for_everyone()
        del trainer
    info = read_checkpoint_info(validated)
    final_source = validated
    if config.stage_a.refit_on_valid:
        refit_dir = output_dir / REFIT_DIR
        epochs = max(1, int(info.get("best_epoch") or 1))
        if main_process:
            print(f"refit: training again from scratch on training + validation events for {epochs} "
                  f"epoch(s) -> {refit_dir}", flush=True)
        refit = StageATrainer(config, data_dir, refit_dir, accelerator=accelerator, train_through="valid",
                              stop_after_epochs=epochs,
                              lr_decay_epochs=(info.get("summary") or {}).get("lr_decay_epochs"),
                              order_check=(info.get("summary") or {}).get("window_reversal"))
        if resume and (refit_dir / "last" / "checkpoint.json").is_file():
            refit.resume()
        refit_summary = refit.fit()
        summary = {**summary, "refit": refit_summary}
        refit.accelerator.wait_for_everyone()
        final_source = refit_dir / "best_model"
    if main_process:
        _save_final_model(config, Path(data_dir), output_dir, final_source, info)
    summary["best_model"] = str(output_dir / "best_model")
    summary["validated_model"] = str(validated)
    return summary


VALIDATED_MODEL = "validated_model"
REFIT_DIR = "refit"


def _save_validated_model(config: Config, data_dir: Path, output_dir: Path, summary: dict[str, Any]) -> None:
    """``validated_model/``: the best model of the validated run, with the neighbour table of
    training events fused at the weight that validation prefers."""
    from ..checkpoint import check_data, load_checkpoint
    from ..evaluation.evaluator import evaluate
    from ..models.item_knn import ItemCooccurrence

    model, _, info = load_checkpoint(output_dir / "best_model")
    data = ProcessedData(data_dir)
    check_data(info, output_dir / "best_model", data)
    knn = config.model.item_knn
    extra: dict[str, Any] = {"summary": summary}
    if knn.enabled:
        stage_a = config.stage_a
        grid = [knn.weight] if knn.weight is not None else sorted(set(knn.weight_grid))
        directions = ["both", "forward"] if knn.direction == "auto" else [knn.direction]
        tables, scores = {}, {}  # scores: (direction, weight) -> validation NDCG@10
        for direction in directions:
            started = time.perf_counter()
            tables[direction] = table = ItemCooccurrence.from_config(data, False, knn, direction)
            print(f"item_knn: {table.info['pairs']:,} neighbour pairs ({direction}) from training events "
                  f"({time.perf_counter() - started:.1f}s)", flush=True)
            for weight in grid:
                model.attach_item_knn(table, weight)
                result = evaluate(model, data, "valid", validation_evaluation(config), config.model.max_seq_len,
                                  protocols=(stage_a.eval_protocol,), max_users=stage_a.eval_max_users)
                scores[direction, weight] = float(result[stage_a.eval_protocol]["NDCG@10"])
                print(f"item_knn: {direction}, weight {weight:g}: valid NDCG@10 {scores[direction, weight]:.4f}",
                      flush=True)
        # Ties: the smaller weight, then both directions (the order of `directions`).
        direction, best = max(scores, key=lambda k: (scores[k], -k[1], -directions.index(k[0])))
        model.attach_item_knn(tables[direction], best)
        label = (lambda d, w: f"{w:g}") if len(directions) == 1 else (lambda d, w: f"{d} {w:g}")
        extra["item_knn_valid_ndcg10"] = {label(d, w): v for (d, w), v in scores.items()}
        extra["metrics"] = {**info.get("metrics", {}), "NDCG@10_fused": scores[direction, best]}
        print(f"item_knn: {direction}, weight {best:g} (validation NDCG@10 {scores[direction, best]:.4f}, "
              f"model alone {info.get('metrics', {}).get('NDCG@10', float('nan')):.4f})", flush=True)
    keep = {k: info[k] for k in ("epoch", "global_step", "metrics", "best_epoch", "trained_on") if k in info}
    save_checkpoint(output_dir / VALIDATED_MODEL, model, config, {**keep, **extra}, data_dir,
                    data_fingerprint=data.fingerprint)


def _save_final_model(config: Config, data_dir: Path, output_dir: Path, source: Path, validated: dict) -> None:
    """``best_model/``: the refit (or the validated model) with the neighbour table of
    training + validation events: what serves users and what the test split measures."""
    from ..checkpoint import check_data, load_checkpoint
    from ..models.item_knn import ItemCooccurrence

    model, _, info = load_checkpoint(source)
    data = ProcessedData(data_dir)
    check_data(info, source, data)
    knn = config.model.item_knn
    extra: dict[str, Any] = {
        "validated_model": str((output_dir / VALIDATED_MODEL).resolve()),
        "metrics": validated.get("metrics", {}),  # validation figures of the validated run
        "best_epoch": validated.get("best_epoch"),
    }
    if knn.enabled:
        weight = float(validated["item_knn"]["weight"])
        direction = validated["item_knn"].get("direction", "both")  # what validation chose
        table = ItemCooccurrence.from_config(data, True, knn, direction)
        model.attach_item_knn(table, weight)
        extra["item_knn_valid_ndcg10"] = validated.get("item_knn_valid_ndcg10")
    keep = {k: info[k] for k in ("epoch", "global_step", "trained_on") if k in info}
    save_checkpoint(output_dir / "best_model", model, config, {**keep, **extra}, data_dir,
                    data_fingerprint=data.fingerprint)
    print(f"final model: {output_dir / 'best_model'} (trained on {info.get('trained_on', 'train')} events"
          f"{', item_knn weight %g over training + validation events' % model.item_knn_weight if knn.enabled else ''}); "
          f"evaluate it on the test split", flush=True)
