"""The training loop: learning, checkpoints, exact resume after kill -9, NaN stop, DDP."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm_recommender.checkpoint import load_checkpoint
from llm_recommender.cli import main as cli_main
from llm_recommender.config import load_config
from llm_recommender.data.dataset import ProcessedData, TrainWindows
from llm_recommender.errors import CheckpointError, ConfigError, TrainingError
from llm_recommender.evaluation.baselines import PopularityBaseline
from llm_recommender.evaluation.evaluator import evaluate
from llm_recommender.trainers.stage_a_trainer import StageATrainer, train_stage_a, validation_evaluation

TINY = [
    "model.base_llm=gpt2",
    "model.random_init_stage_a_llm=true",
    "model.finetune=full",
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "model.embedding_dim=32",
    "model.max_seq_len=20",
    "model.dropout=0.0",
    "embeddings.init_std=0.1",
    "stage_a.batch_size=32",
    "stage_a.learning_rate=3e-3",
    "stage_a.log_every_steps=5",
    "stage_a.patience=0",
    "runtime.num_threads=1",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Generated logs with sequential structure, preprocessed (seconds)."""
    root = tmp_path_factory.mktemp("tiny")
    raw = root / "raw.csv"
    assert cli_main(["generate", "--users", "400", "--items", "120", "--interactions", "8000",
                     "--format", "csv", "--seed", "3", "--output", str(raw)]) == 0
    out = root / "processed"
    assert cli_main(["preprocess", "--output_dir", str(out), "--set", f"data.path={raw}"]) == 0
    return out


def _config(*extra: str):
    return load_config(None, [*TINY, *extra])


def _run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "llm_recommender.cli", *args], env=env,
                          capture_output=True, text=True, **kwargs)


def test_training_learns_and_beats_popularity(tiny_data, tmp_path):
    summary = train_stage_a(_config("stage_a.epochs=6"), tiny_data, tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in history if e["kind"] == "epoch"]
    assert len(epochs) == 6
    assert epochs[-1]["train_cross_entropy"] < epochs[0]["train_cross_entropy"] - 0.3
    for name in ("best_model", "last"):
        assert (tmp_path / "run" / name / "model.safetensors").is_file()
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 1000
    assert summary["best_epoch"] >= 1

    data = ProcessedData(tiny_data)
    model, config, info = load_checkpoint(tmp_path / "run" / "best_model")
    ours = evaluate(model, data, "test", config.evaluation, config.model.max_seq_len)
    popular = evaluate(PopularityBaseline(data), data, "test", config.evaluation, config.model.max_seq_len)
    # The generated data has item-to-item transitions: a sequence model must beat popularity.
    assert ours["sampled"]["NDCG@10"] > popular["sampled"]["NDCG@10"] + 0.05
    assert ours["full"]["NDCG@10"] > popular["full"]["NDCG@10"] + 0.02


def test_checkpoint_reload_gives_identical_scores(tiny_data, tmp_path):
    train_stage_a(_config("stage_a.max_steps=6"), tiny_data, tmp_path / "run")
    first, _, _ = load_checkpoint(tmp_path / "run" / "last")
    second, _, _ = load_checkpoint(tmp_path / "run" / "last")
    users = torch.tensor([1, 2, 3])
    seq = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 0, 0, 0]])
    assert torch.equal(first.full_sort_predict(users, seq), second.full_sort_predict(users, seq))


def test_altered_or_truncated_checkpoint_is_refused(tiny_data, tmp_path):
    train_stage_a(_config("stage_a.max_steps=3"), tiny_data, tmp_path / "run")
    folder = tmp_path / "run" / "best_model"
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="altered or truncated"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path / "run")
    result = _run_cli(["evaluate", "--checkpoint", str(folder)])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "model.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    from llm_recommender.models.stage_a_model import StageAModel

    original = StageAModel.calculate_loss
    calls = {"n": 0}

    def poisoned(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] > 30:  # after the first epoch's checkpoint
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(StageAModel, "calculate_loss", poisoned)
    with pytest.raises(TrainingError, match="non-finite loss"):
        train_stage_a(_config("stage_a.epochs=5"), tiny_data, tmp_path / "run")
    model, _, info = load_checkpoint(tmp_path / "run" / "last")
    assert info["epoch"] >= 1
    assert all(torch.isfinite(t).all() for t in model.trainable_state_dict().values())


def _final_state(run: Path) -> tuple[list[dict], dict]:
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in history if e["kind"] == "epoch"]
    return epochs, load_file(str(run / "last" / "model.safetensors"))


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    """kill -9 at random moments (mid-epoch, mid-checkpoint-write), then --resume: the final
    metrics and weights equal an uninterrupted run's, bit for bit (CPU, same seed)."""
    args = ["train", "--data_dir", str(tiny_data)] + [x for o in [*TINY, "stage_a.epochs=4"] for x in ("--set", o)]
    reference = tmp_path / "reference"
    started = time.monotonic()
    assert _run_cli([*args, "--output_dir", str(reference)]).returncode == 0
    # Kill moments scale with this machine's speed (a fixed delay misses a fast run entirely).
    duration = time.monotonic() - started

    run = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for attempt in range(8):
        resume = ["--resume"] if (run / "last" / "checkpoint.json").is_file() else []
        process = subprocess.Popen([sys.executable, "-m", "llm_recommender.cli", *args,
                                    "--output_dir", str(run), *resume], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt < 3:
            time.sleep(rng.uniform(0.4, 0.9) * duration)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
        _, stderr = process.communicate()
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, stderr
    assert process.returncode == 0 and kills >= 1
    ref_epochs, ref_weights = _final_state(reference)
    run_epochs, run_weights = _final_state(run)
    strip = lambda epochs: [{k: v for k, v in e.items() if "second" not in k} for e in epochs]  # noqa: E731
    assert strip(run_epochs) == strip(ref_epochs)
    assert set(run_weights) == set(ref_weights)
    for key in ref_weights:
        assert torch.equal(run_weights[key], ref_weights[key]), key


def test_learning_rate_decays_on_a_plateau_and_the_refit_replays_it(tiny_data, tmp_path, monkeypatch, capsys):
    """stage_a.lr_decay_patience: the rate is multiplied by lr_decay_factor after every k
    validations without a better NDCG@10; the refit, which never validates, decays after the
    same epochs, so it repeats the validated run's schedule."""

    scripted = iter([0.10, 0.09, 0.20, 0.19, 0.18, 0.17, 0.16, 0.15])

    def validate(self):
        return {"sampled": {"NDCG@10": next(scripted), "HR@10": 0.0}}

    monkeypatch.setattr(StageATrainer, "validate", validate)
    config = _config("stage_a.epochs=20", "stage_a.patience=4", "stage_a.lr_decay_patience=2",
                     "stage_a.lr_decay_factor=0.5", "stage_a.lr_schedule=constant", "stage_a.warmup_ratio=0",
                     "stage_a.refit_on_valid=true")
    summary = train_stage_a(config, tiny_data, tmp_path / "run")
    # Validations 1..7: best at 3; bad 1, 2 (decay after epoch 5), 3, 4 (stop after epoch 7).
    assert summary["best_epoch"] == 3 and summary["epochs"] == 7 and summary["lr_decay_epochs"] == [5]
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train: ")]
    # The validated run states its cap and validation, the refit its fixed length (not the cap).
    assert len(headers) == 2 and "x up to 20 epochs, validation every 1 epoch(s)" in headers[0]
    assert "x 3 epochs (the refit, no validation)" in headers[1]

    def rate_by_epoch(run):
        entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {e["epoch"]: e["lr"] for e in entries if e["kind"] == "train"}

    validated = rate_by_epoch(tmp_path / "run")
    assert validated[5] == pytest.approx(3e-3) and validated[6] == pytest.approx(1.5e-3)
    refit = rate_by_epoch(tmp_path / "run" / "refit")
    assert sorted(refit) == [1, 2, 3] and all(refit[e] == pytest.approx(validated[e]) for e in refit)

    # A refit longer than the decay point replays it after the same epoch.
    replay = StageATrainer(_config("stage_a.epochs=20", "stage_a.lr_decay_factor=0.5",
                                   "stage_a.lr_schedule=constant", "stage_a.warmup_ratio=0"),
                           tiny_data, tmp_path / "replay", train_through="valid", stop_after_epochs=3,
                           lr_decay_epochs=[2])
    replay.fit()
    assert rate_by_epoch(tmp_path / "replay") == {1: pytest.approx(3e-3), 2: pytest.approx(3e-3),
                                                    3: pytest.approx(1.5e-3)}


def test_weight_average_is_validated_saved_and_resumed(tiny_data, tmp_path, monkeypatch):
    """stage_a.ema_decay: validation and best_model/ see the running average of the weights
    (recomputed here from every step's weights), last/ keeps the training weights and the
    averages ride in its state, so a resumed run ends with the same averages."""

    decay = 0.9
    step_weights: list[dict[str, torch.Tensor]] = []
    original_step = StageATrainer._optimizer_step

    def recording_step(self):
        norm = original_step(self)
        step_weights.append({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})
        return norm

    import llm_recommender.evaluation.evaluator as evaluator

    validated: list[dict[str, torch.Tensor]] = []
    original_evaluate = evaluator.evaluate

    def recording_evaluate(model, *args, **kwargs):
        validated.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return original_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(StageATrainer, "_optimizer_step", recording_step)
    monkeypatch.setattr(evaluator, "evaluate", recording_evaluate)
    config = _config("stage_a.epochs=2", f"stage_a.ema_decay={decay}", "stage_a.eval_every_epochs=2")
    trainer = StageATrainer(config, tiny_data, tmp_path / "run")
    average = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.fit()
    for t, weights in enumerate(step_weights):
        w = 1 - min(decay, (1 + t) / (10 + t))
        average = {n: a + w * (weights[n] - a) for n, a in average.items()}
    assert len(validated) == 1 and len(step_weights) == 2 * trainer.steps_per_epoch
    for name, value in average.items():
        assert torch.allclose(validated[0][name], value, atol=1e-6), name
    # The training weights are back after validation, and are what last/ holds.
    last = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    best = load_file(str(tmp_path / "run" / "best_model" / "model.safetensors"))
    raw = step_weights[-1]
    some = next(k for k in best if k in raw and not torch.equal(raw[k], average[k]))
    assert torch.equal(last[some], raw[some]) and torch.allclose(best[some], average[some], atol=1e-6)

    # Resumed after its first epoch, the run ends with the same averages, bit for bit.
    monkeypatch.setattr(StageATrainer, "_optimizer_step", original_step)
    monkeypatch.setattr(evaluator, "evaluate", original_evaluate)
    first = StageATrainer(_config("stage_a.epochs=2", f"stage_a.ema_decay={decay}", "stage_a.eval_every_epochs=2"),
                          tiny_data, tmp_path / "resumed", stop_after_epochs=1)
    first.fit()
    again = StageATrainer(config, tiny_data, tmp_path / "resumed")
    again.resume()
    again.fit()
    resumed = load_file(str(tmp_path / "resumed" / "best_model" / "model.safetensors"))
    assert all(torch.equal(resumed[k], best[k]) for k in best)
    # A run saved without averages cannot be resumed with them.
    train_stage_a(_config("stage_a.epochs=1"), tiny_data, tmp_path / "plain")
    with pytest.raises(TrainingError, match="without stage_a.ema_decay"):
        StageATrainer(config, tiny_data, tmp_path / "plain").resume()


def test_validations_are_at_least_eval_min_steps_apart(tiny_data, tmp_path, monkeypatch):
    """stage_a.eval_min_steps: with 400 users and a batch of 200 (2 steps per epoch), every epoch
    would validate; at least 5 steps apart rounds the cadence up to every 3 epochs, and patience
    counts those validations."""

    scripted = iter([0.10, 0.20, 0.15, 0.14, 0.13, 0.12])

    def validate(self):
        return {"sampled": {"NDCG@10": next(scripted), "HR@10": 0.0}}

    monkeypatch.setattr(StageATrainer, "validate", validate)
    config = _config("stage_a.batch_size=200", "stage_a.epochs=30", "stage_a.patience=2",
                     "stage_a.eval_min_steps=5", "stage_a.lr_schedule=constant", "stage_a.warmup_ratio=0")
    summary = train_stage_a(config, tiny_data, tmp_path / "run")
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validated = [e["epoch"] for e in entries if e["kind"] == "epoch" and "valid_NDCG@10" in e]
    assert validated == [3, 6, 9, 12]  # best at 6, then 2 validations without gain
    assert summary["best_epoch"] == 6 and summary["epochs"] == 12


def test_epoch_loss_average_weighs_every_target_position_the_same(tiny_data, tmp_path):
    """stage_a.loss_average=epoch: a batch's loss is its sum over target positions divided by
    the epoch's average positions per batch (a batch of short windows no longer weighs each of
    its positions more); batch: the mean over the batch's positions."""

    trainer = StageATrainer(_config("stage_a.loss_average=epoch", "model.use_user_token=false"), tiny_data,
                            tmp_path / "run")
    lengths = trainer.windows.lengths  # events per window; targets = events - 1 without the user token
    assert trainer.positions_per_batch == pytest.approx((lengths - 1).mean() * 32)
    batches = trainer._micro_batches(0)
    for indices in batches[:3]:
        batch = trainer._batch_tensors(indices)
        positions = int((batch["targets"] != 0).sum())
        assert trainer._position_weight(batch) == pytest.approx(positions / trainer.positions_per_batch)
    # Over an epoch the weights average to ~1: the learning rate keeps its meaning.
    weights = [trainer._position_weight(trainer._batch_tensors(i)) for i in batches]
    assert 0.8 < sum(weights) / len(weights) < 1.2
    plain = StageATrainer(_config(), tiny_data, tmp_path / "plain")
    assert plain._position_weight(plain._batch_tensors(batches[0])) == 1.0


def test_last_batch_fill_trains_every_window_every_epoch(tiny_data, tmp_path):
    """stage_a.last_batch=fill: 400 windows at batch 150 are 3 batches, the third completed from
    the start of the epoch's order, so every window is in every epoch; drop: 2 batches, a
    different 100 skipped each epoch; a batch larger than the data is an error under drop."""
    from llm_recommender.data.dataset import epoch_batches
    from llm_recommender.errors import ConfigError

    lengths = np.random.default_rng(0).integers(2, 20, 400)
    for bucketing in (False, True):
        filled = epoch_batches(lengths, 150, 7, 3, bucketing, fill_last=True)
        assert [len(b) for b in filled] == [150, 150, 150]
        seen = np.concatenate(filled)
        assert set(seen.tolist()) == set(range(400)) and len(seen) == 450
        again = epoch_batches(lengths, 150, 7, 3, bucketing, fill_last=True)
        assert all((a == b).all() for a, b in zip(filled, again))  # a function of (seed, epoch)
        dropped = epoch_batches(lengths, 150, 7, 3, bucketing)
        assert len(dropped) == 2 and len(set(np.concatenate(dropped).tolist())) == 300
    tiny = epoch_batches(lengths[:10], 32, 7, 0, False, fill_last=True)  # fewer windows than a batch
    assert len(tiny) == 1 and set(tiny[0].tolist()) == set(range(10))
    trainer = StageATrainer(_config("stage_a.batch_size=150", "stage_a.last_batch=fill"), tiny_data, tmp_path / "f")
    assert trainer.steps_per_epoch == 3 and len(trainer._micro_batches(0)) == 3
    with pytest.raises(ConfigError, match="stage_a.last_batch: fill"):
        StageATrainer(_config("stage_a.batch_size=500"), tiny_data, tmp_path / "d")


def test_all_windows_make_every_training_event_a_target_once(tiny_data):
    """stage_a.windows_per_user=null: non-overlapping windows of max_seq_len + 1 events, from the
    most recent back, cover each user's whole training prefix; every event but each window's
    first is a target, once."""
    from llm_recommender.data.dataset import TrainWindows

    data = ProcessedData(tiny_data)
    windows = TrainWindows(data, max_seq_len=5, use_user_token=False, windows_per_user=None)
    one = TrainWindows(data, max_seq_len=5, use_user_token=False, windows_per_user=1)
    batch = windows.batch(np.arange(len(windows)))
    expected_windows = 0
    for user in range(1, data.num_users + 1):
        prefix = np.asarray(data.train_sequence(user)).tolist()
        expected = []
        for end in range(len(prefix), 0, -6):
            window = prefix[max(0, end - 6) : end]
            if len(window) >= 2:  # an input and a target
                expected += window[1:]
                expected_windows += 1
        rows = batch["user_ids"] == user
        got = batch["targets"][rows]
        assert sorted(got[got != 0].tolist()) == sorted(expected)
    assert len(windows) == expected_windows > len(one)


def test_resuming_an_early_stopped_run_trains_nothing_more(tiny_data, tmp_path):
    config = _config("stage_a.epochs=40", "stage_a.patience=1", "stage_a.eval_every_epochs=1",
                     "stage_a.eval_max_users=50")
    first = train_stage_a(config, tiny_data, tmp_path / "run")
    assert first["stopped"].startswith("early stopping") and first["epochs"] < 40
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = train_stage_a(config, tiny_data, tmp_path / "run", resume=True)
    assert again["global_step"] == first["global_step"] and again["epochs"] == first["epochs"]
    assert again["stopped"] == first["stopped"] and again["best_epoch"] == first["best_epoch"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == log


def test_resume_without_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    result = _run_cli(["train", "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "none"), "--resume"])
    assert result.returncode == 2
    assert "nothing to resume" in result.stderr and "Traceback" not in result.stderr


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _launch_two(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # A fresh rendezvous port per launch: back-to-back launches on accelerate's default 29500
    # can meet the previous run's socket still in TIME_WAIT.
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--main_process_port", str(_free_port()),
         "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "llm_recommender.cli", *args],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )


@pytest.mark.slow
def test_two_process_gloo_matches_one_process_with_doubled_batch(tiny_data, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine (2 processes,
    gloo) with batch B equals 1 process with batch 2B."""
    common = [*TINY, "stage_a.max_steps=8", "stage_a.collaborative.use_bpr_loss=false",
              "stage_a.warmup_ratio=0", "stage_a.lr_schedule=constant", "stage_a.eval_max_users=50"]
    sets = lambda extra: [x for o in [*common, *extra] for x in ("--set", o)]  # noqa: E731
    single = tmp_path / "single"
    result = _run_cli(["train", "--data_dir", str(tiny_data), "--output_dir", str(single),
                       *sets(["stage_a.batch_size=32"])])
    assert result.returncode == 0, result.stderr
    double = tmp_path / "ddp"
    result = _launch_two(["train", "--data_dir", str(tiny_data), "--output_dir", str(double),
                          *sets(["stage_a.batch_size=16"])])
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_file(str(single / "last" / "model.safetensors"))
    b = load_file(str(double / "last" / "model.safetensors"))
    assert set(a) == set(b)
    # Same examples and the same loss normalisation per global step: equal up to the order
    # of floating-point sums, which Adam's normalisation amplifies in rows whose gradient is
    # tiny (an update is ~lr=3e-3 whatever the gradient's size). Without the loss weighting
    # of StageATrainer._position_weight the largest difference was 0.004.
    # Measured: mean differences <= 3e-6 per tensor, the largest single entry 1e-3 (one user
    # row coordinate whose Adam update flipped sign); a batch split wrongly between processes
    # moves the weights by ~lr per step (3e-3) everywhere.
    for key in a:
        diff = (a[key] - b[key]).abs()
        assert float(diff.mean()) < 2e-5 and float(diff.max()) < 5e-3, (key, float(diff.mean()), float(diff.max()))



@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes_bit_for_bit(tiny_data, tmp_path):
    """``runtime.fsdp=true`` over 2 gloo processes (FSDP2, sharded weights and optimizer
    state) trains the same model as DDP, writes ordinary checkpoints, and a run stopped
    half-way and resumed ends with the same weights, bit for bit: every rank's dropout RNG
    and the sharded optimizer state come back."""
    common = [*TINY, "model.num_layers=2", "model.dropout=0.1", "stage_a.batch_size=16",
              "stage_a.collaborative.use_bpr_loss=false", "stage_a.warmup_ratio=0",
              "stage_a.lr_schedule=constant", "stage_a.eval_max_users=50"]
    sets = lambda extra: [x for o in [*common, *extra] for x in ("--set", o)]  # noqa: E731
    base = ["train", "--data_dir", str(tiny_data), "--output_dir"]
    runs = {
        "ddp": sets(["stage_a.max_steps=8"]),
        "fsdp": sets(["stage_a.max_steps=8", "runtime.fsdp=true"]),
        "half": sets(["stage_a.max_steps=4", "runtime.fsdp=true"]),
    }
    for name, overrides in runs.items():
        result = _launch_two([*base, str(tmp_path / name), *overrides])
        assert result.returncode == 0, result.stderr[-3000:]
    resumed = _launch_two([*base, str(tmp_path / "half"), *runs["fsdp"], "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ddp = load_file(str(tmp_path / "ddp" / "last" / "model.safetensors"))
    fsdp = load_file(str(tmp_path / "fsdp" / "last" / "model.safetensors"))
    again = load_file(str(tmp_path / "half" / "last" / "model.safetensors"))
    assert set(ddp) == set(fsdp) == set(again)
    for key in ddp:  # reduce-scatter vs all-reduce: the same sums in another order
        assert float((ddp[key] - fsdp[key]).abs().max()) < 1e-5, key
        assert torch.equal(fsdp[key], again[key]), key
    model, _, info = load_checkpoint(tmp_path / "fsdp" / "best_model")
    assert info["global_step"] == 8
    assert all(torch.equal(t, fsdp[k]) for k, t in model.trainable_state_dict().items())


def test_tied_training_events_are_reordered_every_epoch_and_nothing_else_moves(tmp_path):
    """stage_a.shuffle_tied_events: a user's training events with one timestamp get a new
    order each epoch (a function of seed and epoch); single events, other users' events,
    validation and test events stay where the file put them."""
    from llm_recommender.data.dataset import TrainWindows

    from processed_helpers import write_processed

    folder = tmp_path / "ties"
    write_processed(folder, [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    # user 1: events 0-2 tie (train), event 3 alone, 4-6 tie but 5-6 are valid/test;
    # user 2: one timestamp, equal to user 1's last: 3 training events tie, then valid/test.
    np.save(folder / "seq_timestamps.npy", np.array([0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2], dtype=np.int64))
    data = ProcessedData(folder)
    windows = TrainWindows(data, max_seq_len=10, use_user_token=False, windows_per_user=None, shuffle_ties=True)
    assert windows.num_tied_events == 6
    file_order = np.asarray(data.items).tolist()
    orders = set()
    for epoch in range(1, 21):
        windows.set_epoch(7, epoch)
        items = windows.items.tolist()
        assert sorted(items[0:3]) == [1, 2, 3] and sorted(items[7:10]) == [8, 9, 10]
        assert items[3:7] == file_order[3:7] and items[10:] == file_order[10:]
        orders.add((tuple(items[0:3]), tuple(items[7:10])))
        again = TrainWindows(data, max_seq_len=10, use_user_token=False, windows_per_user=None, shuffle_ties=True)
        again.set_epoch(7, epoch)
        assert again.items.tolist() == items  # a resumed run (or another process) sees the same order
        batch = windows.batch(np.arange(len(windows)))
        # Batches read the epoch's order: every training event but each user's first is a target.
        assert sorted(batch["targets"][batch["targets"] != 0].tolist()) == sorted(items[1:5] + items[8:10])
    assert len(orders) > 10
    # A refit view trains on validation events too: user 1's events 4-5 now tie, user 2's
    # validation event joins its group; the test events stay.
    refit = TrainWindows(ProcessedData(folder, train_through="valid"), 10, False, None, shuffle_ties=True)
    assert refit.num_tied_events == 3 + 2 + 4
    for epoch in range(1, 6):
        refit.set_epoch(7, epoch)
        assert refit.items[6] == 7 and refit.items[11] == 12
    # Off (the default): the file's order every epoch.
    plain = TrainWindows(data, max_seq_len=10, use_user_token=False, windows_per_user=None)
    plain.set_epoch(7, 3)
    assert plain.num_tied_events == 0 and plain.items.tolist() == file_order


def test_target_groups_follow_the_targets_through_shuffles_and_deletions(tmp_path):
    """TrainWindows(tie_groups=True): each target carries its run id (shared by a user's
    same-timestamp training events, own otherwise), with and without the user token, after a
    shuffle of the ties and after deletions; 0 where there is no target."""
    from llm_recommender.data.dataset import TrainWindows

    from processed_helpers import write_processed

    folder = tmp_path / "groups"
    write_processed(folder, [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    np.save(folder / "seq_timestamps.npy", np.array([0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2], dtype=np.int64))
    data = ProcessedData(folder)
    tied = {1: "a", 2: "a", 3: "a", 4: "b", 5: "c", 8: "d", 9: "d", 10: "d"}  # item -> run (training)
    for user_token, deletion in ((False, 0.0), (True, 0.0), (False, 0.5)):
        windows = TrainWindows(data, 10, user_token, None, shuffle_ties=True, deletion_prob=deletion, tie_groups=True)
        for epoch in range(1, 6):
            windows.set_epoch(3, epoch)
            batch = windows.batch(np.arange(len(windows)))
            targets, groups = batch["targets"], batch["target_groups"]
            assert groups.shape == targets.shape and np.all((groups == 0) == (targets == 0))
            runs = {}
            for item, group in zip(targets.ravel().tolist(), groups.ravel().tolist()):
                if item:
                    runs.setdefault(tied[item], set()).add(group)
            assert all(len(ids) == 1 for ids in runs.values()), runs  # one id per run
            assert len({next(iter(ids)) for ids in runs.values()}) == len(runs)  # runs differ
    plain = TrainWindows(data, 10, False, None, shuffle_ties=True)
    assert "target_groups" not in plain.batch(np.arange(len(plain)))


def test_window_reversal_reads_some_windows_backwards_anew_every_epoch(tmp_path):
    """stage_a.window_reversal_prob: a reversed row is its window read backwards (inputs and
    targets), padding at the end; the same (seed, epoch, batch) reverses the same rows."""
    from llm_recommender.data.dataset import TrainWindows

    from processed_helpers import write_processed

    folder = tmp_path / "rev"
    write_processed(folder, [list(range(1 + 10 * u, 1 + 10 * u + n)) for u, n in enumerate([8, 5, 4, 6])])
    data = ProcessedData(folder)
    windows = TrainWindows(data, max_seq_len=10, use_user_token=False, windows_per_user=None, reversal_prob=0.5)
    rows = np.arange(len(windows))
    plain = TrainWindows(data, max_seq_len=10, use_user_token=False, windows_per_user=None).batch(rows)
    patterns = set()
    for epoch in range(8):
        windows.set_epoch(5, epoch)
        batch = windows.batch(rows)
        again = windows.batch(rows)
        assert all(np.array_equal(batch[k], again[k]) for k in batch)
        flipped = []
        for r in rows:
            n = int((plain["targets"][r] != 0).sum())
            events = [int(plain["item_seq"][r, 0]), *plain["targets"][r, :n].tolist()]
            got = [int(batch["item_seq"][r, 0]), *batch["targets"][r, :n].tolist()]
            assert got in (events, events[::-1])
            assert np.array_equal(batch["item_seq"][r, :n], np.array(got[:-1]))
            assert not batch["targets"][r, n:].any()
            flipped.append(got != events)
        patterns.add(tuple(flipped))
        assert "reversed" not in batch
        flagged = TrainWindows(data, 10, False, None, reversal_prob=0.5, reversal_flags=True)
        flagged.set_epoch(5, epoch)
        flagged_batch = flagged.batch(rows)
        assert np.array_equal(flagged_batch["reversed"], np.array(flipped, dtype=np.float32))  # model.direction_token
        assert np.array_equal(flagged_batch["targets"], batch["targets"])
    assert len(patterns) > 2
    unflipped = TrainWindows(data, 10, False, None, reversal_flags=True).batch(rows)
    assert not unflipped["reversed"].any()


def test_same_target_positives_are_other_users_prefixes_before_the_same_item(tmp_path):
    """stage_a.contrastive_positive=same_target: each row's positive is another user's training
    prefix that ends just before an event of the row's last target (DuoRec's supervised
    positive), its most recent items up to the batch's input width, drawn anew per epoch; a row
    whose item no other user has gets its own input and user."""
    from processed_helpers import write_processed

    folder = tmp_path / "pos"
    # Training prefixes (the last two events are validation and test): u1 1 2 3 9, u2 5 6 9,
    # u3 7 9, u4 8 4 (item 4: no other user).
    write_processed(folder, [[1, 2, 3, 9, 20, 21], [5, 6, 9, 22, 23], [7, 9, 24, 25], [8, 4, 26, 27]])
    data = ProcessedData(folder)
    windows = TrainWindows(data, max_seq_len=2, use_user_token=False, windows_per_user=1,
                           same_target_positives=True)
    rows = np.arange(len(windows))
    options = {1: {(5, 6): 2, (7,): 3}, 2: {(2, 3): 1, (7,): 3}, 3: {(2, 3): 1, (5, 6): 2}}
    seen = {user: set() for user in options}
    for epoch in range(12):
        windows.set_epoch(1, epoch)
        batch = windows.batch(rows)
        assert all(np.array_equal(batch[k], windows.batch(rows)[k]) for k in batch)
        for r, user in enumerate(batch["user_ids"].tolist()):
            prefix = tuple(v for v in batch["positive_seq"][r].tolist() if v)
            own = tuple(v for v in batch["item_seq"][r].tolist() if v)
            if user == 4 or (prefix, batch["positive_users"][r]) == (own, user):  # its own input
                assert prefix == own and batch["positive_users"][r] == user and (user != 4 or own == (8,))
                continue
            assert options[user][prefix] == batch["positive_users"][r]
            seen[user].add(prefix)
    assert all(len(prefixes) == 2 for prefixes in seen.values())
    assert "positive_seq" not in TrainWindows(data, 2, False, 1).batch(rows)


@pytest.mark.parametrize("positive", ["dropout", "same_target"])
def test_contrastive_term_trains_end_to_end(tiny_data, tmp_path, positive):
    summary = train_stage_a(
        _config("stage_a.loss_weights.contrastive=0.1", f"stage_a.contrastive_positive={positive}",
                "model.dropout=0.1", "stage_a.max_steps=3", "stage_a.log_every_steps=1"),
        tiny_data, tmp_path / positive,
    )
    history = [json.loads(line) for line in (tmp_path / positive / "metrics.jsonl").read_text().splitlines()]
    terms = [e["contrastive"] for e in history if e["kind"] == "train"]
    assert terms and all(math.isfinite(v) and v > 0 for v in terms)
    assert summary["best_epoch"] >= 1


def test_direction_token_learns_on_reversed_windows_and_never_touches_the_forward_reading(tiny_data, tmp_path):
    """model.direction_token: a learned vector added to the tokens of windows read in reverse.
    It starts at zero, moves only through reversed windows, is saved with the checkpoint, and
    evaluation (which reads forward) never adds it."""
    from llm_recommender.models.stage_a_model import build_model

    flags = ("model.direction_token=true", "stage_a.window_reversal_prob=0.5")
    train_stage_a(_config(*flags, "stage_a.max_steps=8"), tiny_data, tmp_path / "run")
    model, config, _ = load_checkpoint(tmp_path / "run" / "last")
    vector = model.direction_embedding.detach()
    assert vector.abs().sum() > 0
    users = torch.tensor([1, 2])
    seq = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    model.eval()
    with torch.no_grad():
        plain = model(users, seq)
        assert torch.equal(model(users, seq, torch.zeros(2)), plain)
        assert not torch.allclose(model(users, seq, torch.ones(2)), plain)
        scores = model.full_sort_predict(users, seq)
        model.direction_embedding.zero_()
        assert torch.equal(model.full_sort_predict(users, seq), scores)  # evaluation reads forward
    # Without reversed windows (the weak_order gate off: Beauty, Wikipedia) the vector gets a
    # zero gradient only: it stays at zero and the network is exactly the one trained without it.
    train_stage_a(_config("model.direction_token=true", "stage_a.max_steps=4"), tiny_data, tmp_path / "still")
    train_stage_a(_config("stage_a.max_steps=4"), tiny_data, tmp_path / "without")
    still, _, _ = load_checkpoint(tmp_path / "still" / "last")
    without, _, _ = load_checkpoint(tmp_path / "without" / "last")
    assert not still.direction_embedding.abs().sum()
    weights = without.trainable_state_dict()
    assert all(torch.equal(tensor, weights[key]) for key, tensor in still.trainable_state_dict().items()
               if key != "direction_embedding")
    assert build_model(_config(), 10, 20).direction_embedding is None
    # SASRec's padded window (model.attend_padding): the vector goes on the items, not the padding slots.
    padded = build_model(_config("model.direction_token=true", "model.attend_padding=true"), 10, 20).eval()
    with torch.no_grad():
        padded.direction_embedding.normal_()
        short = torch.tensor([[1, 2, 0, 0]])
        forward, backward = padded(users[:1], short), padded(users[:1], short, torch.ones(1))
        window = torch.tensor([[0, 0, 1, 2]])  # the left-padded window the padded path builds
        tokens = padded.embeddings.item_tokens(window)
        marked = padded._direction(tokens, torch.ones(1), window != 0)
    assert not torch.allclose(forward, backward)
    assert torch.equal(marked[:, :2], tokens[:, :2]) and not torch.allclose(marked[:, 2:], tokens[:, 2:])


def test_window_reversal_weak_order_reads_the_order_strength_off_item_knn(tmp_path):
    """stage_a.window_reversal=weak_order: reversal only where item-kNN validates higher
    counting both orders than forward only: off for chains read one way, on for baskets whose
    order is random; a function of the data, the same for the refit."""
    from llm_recommender.trainers.stage_a_trainer import StageATrainer, order_strength

    from processed_helpers import write_processed

    chains = [list(range(k, k + 6)) for k in range(1, 31)]  # every user walks the same chain
    rng = np.random.default_rng(0)
    baskets = [[int(i) for i in rng.permutation(np.arange(1, 7) + 6 * (u % 6))[:5]] for u in range(30)]
    config = _config("stage_a.window_reversal_prob=0.5", "stage_a.window_reversal=weak_order", "stage_a.last_batch=fill")
    strong = order_strength(config, ProcessedData(write_processed(tmp_path / "chains", chains).path))
    weak = order_strength(config, ProcessedData(write_processed(tmp_path / "baskets", baskets).path))
    assert not strong["weak"] and weak["weak"], (strong, weak)
    off = StageATrainer(config, tmp_path / "chains", tmp_path / "run_off")
    on = StageATrainer(config, tmp_path / "baskets", tmp_path / "run_on")
    refit = StageATrainer(config, tmp_path / "baskets", tmp_path / "refit", train_through="valid")
    assert off.windows.reversal_prob == 0.0 and on.windows.reversal_prob == 0.5 == refit.windows.reversal_prob
    handed = StageATrainer(config, tmp_path / "baskets", tmp_path / "refit2", train_through="valid", order_check=strong)
    assert handed.order_check is strong and handed.windows.reversal_prob == 0.0  # the answer it was given
    always = StageATrainer(_config("stage_a.window_reversal_prob=0.5", "stage_a.last_batch=fill"), tmp_path / "chains",
                           tmp_path / "run")
    assert always.windows.reversal_prob == 0.5 and always.order_check is None


def test_item_deletion_keeps_order_and_the_last_target_and_repeats_per_epoch(tmp_path):
    """stage_a.item_deletion_prob: each row is its window with events deleted (never the last,
    always one input left), in the original order; the same (seed, epoch, batch) deletes the
    same events (a resumed run), another epoch others; the expected target count follows p."""
    from llm_recommender.data.dataset import TrainWindows

    from processed_helpers import write_processed

    folder = tmp_path / "del"
    histories = [list(range(1 + 20 * u, 1 + 20 * u + n)) for u, n in enumerate([20, 12, 4, 3])]
    write_processed(folder, histories)
    data = ProcessedData(folder)
    plain = TrainWindows(data, max_seq_len=30, use_user_token=False, windows_per_user=None)
    windows = TrainWindows(data, max_seq_len=30, use_user_token=False, windows_per_user=None, deletion_prob=0.5)
    rows = np.arange(len(windows))
    full = plain.batch(rows)
    seen, kept = set(), []
    for epoch in range(6):
        windows.set_epoch(3, epoch)
        batch = windows.batch(rows)
        again = TrainWindows(data, 30, False, None, deletion_prob=0.5)
        again.set_epoch(3, epoch)
        assert all(np.array_equal(batch[k], again.batch(rows)[k]) for k in batch)
        for r in rows:
            original = [i for i in np.concatenate([full["item_seq"][r][:1], full["targets"][r]]) if i]
            row = [i for i in np.concatenate([batch["item_seq"][r][:1], batch["targets"][r]]) if i]
            assert row[-1] == original[-1] and len(row) >= 2  # the last target stays, one input too
            assert row == [i for i in original if i in set(row)]  # a subsequence, in order
            kept.append((len(row) - 1) / (len(original) - 1))
        seen.add(tuple(batch["targets"][0]))
    assert len(seen) > 3 and 0.4 < np.mean(kept) < 0.75
    assert np.allclose(windows.expected_targets, (plain.lengths - 1) * 0.5)
    with pytest.raises(ConfigError, match="stage_a.item_deletion_prob"):
        _config("stage_a.item_deletion_prob=1.0")


def test_item_substitution_changes_inputs_only_and_repeats_per_epoch(tmp_path):
    """stage_a.item_substitution_prob: about p of the input items are replaced by catalogue
    items, padding stays padding, the targets stay the true events; the same (seed, epoch,
    batch) draws the same replacements (a resumed run), another epoch others."""
    from llm_recommender.data.dataset import TrainWindows

    from processed_helpers import write_processed

    folder = tmp_path / "sub"
    histories = [list(range(1 + 20 * u, 1 + 20 * u + n)) for u, n in enumerate([20, 12, 4, 3])]
    write_processed(folder, histories)
    data = ProcessedData(folder)
    plain = TrainWindows(data, max_seq_len=30, use_user_token=False, windows_per_user=None)
    rows = np.arange(len(plain))
    full = plain.batch(rows)
    changed, seen = [], set()
    for epoch in range(20):
        noisy = TrainWindows(data, 30, False, None, substitution_prob=0.3)
        noisy.set_epoch(5, epoch)
        batch = noisy.batch(rows)
        again = TrainWindows(data, 30, False, None, substitution_prob=0.3)
        again.set_epoch(5, epoch)
        assert all(np.array_equal(batch[k], again.batch(rows)[k]) for k in batch)
        assert np.array_equal(batch["targets"], full["targets"])
        real = full["item_seq"] > 0
        assert np.array_equal(batch["item_seq"] > 0, real)  # padding stays, no input is lost
        assert batch["item_seq"].max() <= data.num_items
        changed.append((batch["item_seq"] != full["item_seq"])[real].mean())
        seen.add(tuple(batch["item_seq"][0]))
    assert 0.2 < np.mean(changed) < 0.35 and len(seen) > 10
    with pytest.raises(ConfigError, match="stage_a.item_substitution_prob"):
        _config("stage_a.item_substitution_prob=1.0")


def test_the_trainer_reorders_tied_events_at_every_epoch(tiny_data, tmp_path, monkeypatch, capsys):
    from llm_recommender.data.dataset import TrainWindows

    calls = []
    original = TrainWindows.set_epoch

    def spy(self, seed, epoch):
        calls.append((seed, epoch, self.num_tied_events))
        original(self, seed, epoch)

    monkeypatch.setattr(TrainWindows, "set_epoch", spy)
    tied_data = tmp_path / "tied"
    shutil.copytree(tiny_data, tied_data)
    stamps = np.load(tied_data / "seq_timestamps.npy")
    np.save(tied_data / "seq_timestamps.npy", np.arange(len(stamps)) // 3)  # events logged three at a time
    train_stage_a(_config("stage_a.epochs=2", "stage_a.shuffle_tied_events=true", "stage_a.seed=5"),
                  tied_data, tmp_path / "run")
    tied = calls[0][2]
    assert tied > 0 and calls == [(5, 0, tied), (5, 1, tied)]  # epochs count from 0
    assert f"({tied:,} tied events reordered every epoch)" in capsys.readouterr().out


def test_validation_takes_its_own_deletion_readings(tiny_data, tmp_path):
    """``stage_a.eval_deletion_readings`` sets the readings of the validation that picks the
    best epoch; ``null`` keeps the evaluation's own, and the evaluation config is untouched."""
    base = ("evaluation.deletion_readings=3", "evaluation.deletion_prob=0.3", "stage_a.eval_protocol=full")
    trainer = StageATrainer(_config(*base, "stage_a.eval_deletion_readings=0"), tiny_data, tmp_path / "a")
    model = trainer._eval_model()
    data = ProcessedData(tiny_data)
    plain, read = (evaluate(model, data, "valid", dataclasses.replace(trainer.config.evaluation, deletion_readings=n),
                            trainer.config.model.max_seq_len, protocols=("full",)) for n in (0, 3))
    assert plain["full"]["NDCG@10"] != read["full"]["NDCG@10"]  # the readings do move the score
    assert trainer.validate()["full"]["NDCG@10"] == plain["full"]["NDCG@10"]
    assert trainer.config.evaluation.deletion_readings == 3
    # The neighbour weight of validated_model and the order-strength gate validate the same way.
    assert validation_evaluation(trainer.config) == dataclasses.replace(trainer.config.evaluation, deletion_readings=0)
    same = StageATrainer(_config(*base), tiny_data, tmp_path / "b")
    same.model.load_state_dict(model.state_dict())
    assert same.validate()["full"]["NDCG@10"] == read["full"]["NDCG@10"]
    assert validation_evaluation(same.config) is same.config.evaluation
    with pytest.raises(ConfigError, match="stage_a.eval_deletion_readings"):
        _config("stage_a.eval_deletion_readings=-1")


def test_validation_takes_its_own_item_readings():
    """``stage_a.eval_item_readings`` sets the item readings of every validation, beside
    ``eval_deletion_readings``; the evaluation config keeps its own for evaluate and serving."""
    config = _config("evaluation.item_readings=3", "evaluation.deletion_readings=4",
                     "stage_a.eval_item_readings=0", "stage_a.eval_deletion_readings=0")
    assert validation_evaluation(config) == dataclasses.replace(config.evaluation, item_readings=0, deletion_readings=0)
    assert (config.evaluation.item_readings, config.evaluation.deletion_readings) == (3, 4)
    only = _config("evaluation.item_readings=3", "stage_a.eval_item_readings=1")
    assert validation_evaluation(only) == dataclasses.replace(only.evaluation, item_readings=1)
    with pytest.raises(ConfigError, match="stage_a.eval_item_readings"):
        _config("stage_a.eval_item_readings=-1")
