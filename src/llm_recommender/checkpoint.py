"""Checkpoints: safetensors for tensors, YAML/JSON for the rest. Never pickle.

A checkpoint folder (``best_model/``, ``last/``) holds:

- ``model.safetensors``: ``StageAModel.trainable_state_dict()``: the ID tables, projections,
  output head and only the backbone weights that changed (all of them for full fine-tuning,
  the adapter for LoRA, none when frozen: the base model is referenced by ``model.base_llm``).
  A randomly initialised backbone cannot be referenced by name, so it is always stored.
- ``config.yaml``: the resolved config that made it (a run can be repeated from it).
- ``checkpoint.json``: format version, catalogue sizes, the processed data it was trained on
  (path, sha256 of its source, and ``data_fingerprint``: the hash of its id maps, sequences
  and split labels, see :func:`check_data`), epoch/step, validation metrics, and the sha256 of
  every file in the folder (a truncated or altered file is a clear error, not garbage scores).
- ``item_knn.safetensors`` (with ``model.item_knn.enabled``): the item neighbour table fused
  into the scores; its weight and provenance are in ``checkpoint.json`` under ``item_knn``.
- ``user_ids.txt``, ``item_ids.txt``: copies of the data's id maps, so recommendations map
  back to original ids even when the data folder has moved.
- ``last/`` also holds ``training_state.safetensors`` + ``training_state.json``: optimizer,
  scheduler, RNG states and loop counters for ``--resume``.

Folders are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import Config, config_from_dict, load_saved_config, save_config
from .errors import CheckpointError, ConfigError
from .io_utils import atomic_directory, atomic_write_json, sha256_file

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_KIND = "llm_recommender.stage_a"
MODEL_FILE = "model.safetensors"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
ITEM_KNN_FILE = "item_knn.safetensors"


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    config: Config,
    info: dict[str, Any],
    data_dir: str | Path,
    training_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    data_fingerprint: str | None = None,
) -> None:
    """Write a checkpoint folder atomically.

    Args:
        folder: destination (replaced as a whole).
        model: the ``StageAModel`` (unwrapped).
        config: the resolved config.
        info: extra JSON fields (epoch, global_step, metrics, ...).
        data_dir: the processed data folder the model was trained on.
        training_state: (tensors, json) of optimizer/scheduler/RNG for ``last/``.
        data_fingerprint: ``ProcessedData.fingerprint`` of ``data_dir`` (computed when None).
    """
    data_dir = Path(data_dir).resolve()
    if data_fingerprint is None:
        from .data.dataset import ProcessedData

        data_fingerprint = ProcessedData(data_dir).fingerprint
    with atomic_directory(folder) as tmp:
        state = model.trainable_state_dict()  # tables, projections, changed backbone weights
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        save_config(config, tmp / "config.yaml")
        knn = getattr(model, "item_knn", None)
        if knn is not None:
            knn.save(tmp / ITEM_KNN_FILE)
            info = {**info, "item_knn": {"weight": float(model.item_knn_weight), **knn.info}}
        for name in ("user_ids.txt", "item_ids.txt"):
            source = data_dir / name
            if source.is_file():
                shutil.copyfile(source, tmp / name)
        if training_state is not None:
            tensors, state_json = training_state
            save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "pt"})
            atomic_write_json(tmp / STATE_JSON, state_json)
        data_meta = _read_json(data_dir / "meta.json", required=False) or {}
        payload = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "kind": CHECKPOINT_KIND,
            "package_version": __version__,
            "num_users": int(model.num_users),
            "num_items": int(model.num_items),
            "data_dir": str(data_dir),
            "data_sha256": (data_meta.get("source") or {}).get("sha256"),
            "data_fingerprint": data_fingerprint,
            "base_llm": config.model.base_llm,
            "finetune_mode": config.model.finetune_mode,
            "backbone": getattr(model, "backbone_info", {}),
            **info,
        }
        payload["files"] = {
            path.name: sha256_file(path) for path in sorted(tmp.iterdir()) if path.is_file()
        }
        atomic_write_json(tmp / "checkpoint.json", payload)


def _read_json(path: Path, required: bool = True) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt JSON ({exc.__class__.__name__})") from None


def read_checkpoint_info(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and check ``checkpoint.json``; with ``verify``, check every file's sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    info_path = folder / "checkpoint.json"
    if not info_path.is_file():
        hint = ""
        if (folder / "best_model" / "checkpoint.json").is_file():
            hint = f" (did you mean {folder / 'best_model'}?)"
        raise CheckpointError(f"{folder}: not a checkpoint folder (no checkpoint.json){hint}")
    info = _read_json(info_path)
    if info.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{info_path}: not an llm_recommender Stage A checkpoint")
    if info.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{info_path}: format_version {info.get('format_version')!r}, this package reads "
            f"{CHECKPOINT_FORMAT_VERSION}"
        )
    if verify:
        for name, digest in (info.get("files") or {}).items():
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing from the checkpoint")
            if sha256_file(path) != digest:
                raise CheckpointError(f"{path}: altered or truncated (sha256 differs from checkpoint.json)")
    return info


def load_checkpoint(
    folder: str | Path,
    device: str | torch.device = "cpu",
    overrides: list[str] | None = None,
    verify: bool = True,
):
    """Rebuild a trained model from a checkpoint folder (no unpickling anywhere).

    Args:
        folder: a ``best_model/`` or ``last/`` folder.
        device: where to put the model.
        overrides: ``--set`` strings applied to the saved config (e.g. ``evaluation.*``).
        verify: check file hashes first.

    Returns:
        (model in eval mode, config, info dict of checkpoint.json)
    """
    from .config import apply_overrides
    from .models.stage_a_model import StageAModel

    folder = Path(folder)
    info = read_checkpoint_info(folder, verify=verify)
    try:
        config = load_saved_config(folder / "config.yaml")
        if overrides:
            raw = config.to_dict()
            config = config_from_dict(apply_overrides(raw, overrides), "--set")
    except ConfigError as exc:
        raise CheckpointError(f"{folder / 'config.yaml'}: {exc}") from None
    try:
        state = load_file(str(folder / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / MODEL_FILE}: unreadable ({exc})") from None
    model = StageAModel(config, int(info["num_users"]), int(info["num_items"]))
    try:
        model.load_trainable_state_dict(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder / MODEL_FILE}: {exc}") from None
    if (folder / ITEM_KNN_FILE).is_file():
        from .models.item_knn import ItemCooccurrence

        table = ItemCooccurrence.load(folder / ITEM_KNN_FILE)
        weight = (info.get("item_knn") or {}).get("weight")
        if weight is None or table.num_items != int(info["num_items"]):
            raise CheckpointError(f"{folder / ITEM_KNN_FILE}: does not match {folder / 'checkpoint.json'}")
        model.attach_item_knn(table, float(weight))
    model.to(device)
    model.eval()
    return model, config, info


def load_training_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``training_state.*`` of a ``last/`` folder (for ``--resume``)."""
    folder = Path(folder)
    path = folder / STATE_TENSORS
    if not path.is_file():
        raise CheckpointError(f"{folder}: no training state to resume from ({STATE_TENSORS} missing)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    return tensors, _read_json(folder / STATE_JSON)


# ----------------------------------------------------------------- optimizer state <-> safetensors


def flatten_state(prefix: str, state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Split a nested state (optimizer/scheduler ``state_dict``) into tensors and JSON.

    Tensors go to ``tensors`` under a dotted key and are replaced by ``{"__tensor__": key}``.
    """
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {
            "__dict__": [[_json_key(k), flatten_state(f"{prefix}.{k}", v, tensors)] for k, v in state.items()]
        }
    if isinstance(state, (list, tuple)):
        return [flatten_state(f"{prefix}.{i}", v, tensors) for i, v in enumerate(state)]
    if isinstance(state, (int, float, str, bool)) or state is None:
        return state
    raise TypeError(f"cannot store {type(state).__name__} in a checkpoint at {prefix}")


def _json_key(key: Any) -> Any:
    if isinstance(key, (int, str)):
        return key
    raise TypeError(f"cannot store dict key {key!r}")


def unflatten_state(payload: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(payload, dict) and "__tensor__" in payload:
        key = payload["__tensor__"]
        if key not in tensors:
            raise CheckpointError(f"training state: tensor {key} missing")
        return tensors[key]
    if isinstance(payload, dict) and "__dict__" in payload:
        return {k: unflatten_state(v, tensors) for k, v in payload["__dict__"]}
    if isinstance(payload, list):
        return [unflatten_state(v, tensors) for v in payload]
    return payload


def check_data(info: dict[str, Any], checkpoint: str | Path, data, allow_new_events: bool = False) -> None:
    """Refuse processed data other than the data a checkpoint was trained on.

    Preprocessing the same raw file again with another split or threshold keeps the catalogue
    size but moves events between splits: a model (and its neighbour table) would then be
    scored on events it trained on, without a word. The fingerprint
    (``ProcessedData.fingerprint``) covers the id maps, the sequences and the split labels.

    Args:
        info: the checkpoint's ``checkpoint.json``.
        checkpoint: its folder (for the message).
        data: the ``ProcessedData`` about to be used.
        allow_new_events: inference only (recommend, serve, export): accept other events and
            splits as long as the id maps are the checkpoint's own (users' newer histories);
            never for evaluation.

    Raises:
        DataError: the fingerprints differ (or the checkpoint records none), or, with
            ``allow_new_events``, the id maps differ.
    """
    from .errors import DataError

    recorded = info.get("data_fingerprint")
    if recorded == data.fingerprint:
        return
    if allow_new_events:
        for name in ("user_ids.txt", "item_ids.txt"):
            copy = Path(checkpoint) / name
            if not copy.is_file() or sha256_file(copy) != sha256_file(Path(data.path) / name):
                raise DataError(
                    f"{Path(data.path) / name}: differs from the id map the model {checkpoint} was trained "
                    "with; new events can be served only over the same users and items"
                )
        return
    if recorded is None:
        raise DataError(
            f"{checkpoint}: records no data fingerprint (written by an older version), so it cannot be "
            f"checked against {data.path}; train it again"
        )
    raise DataError(
        f"{data.path}: data fingerprint {data.fingerprint[:12]} is not {recorded[:12]}, the data "
        f"{checkpoint} was trained on (preprocessed again, or other data): use the folder it was trained "
        "on, or train on this one"
    )
