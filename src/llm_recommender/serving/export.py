"""Export a checkpoint's vectors for a vector index (``llmrec export-embeddings``).

The output folder (written under a temporary name, renamed at the end) holds:

| file | content |
|---|---|
| ``item_embeddings.npy`` | float32 ``(num_items, d)``: row ``r`` is item index ``r + 1``, i.e. line ``r + 1`` of ``item_ids.txt`` (padding row 0 of the model's table is left out) |
| ``user_states.npy`` | float32 ``(num_users, d)``: the **query vector** of every known user, ``model.user_state`` over the user's whole history (last ``max_seq_len`` items); row ``r`` is user ``r + 1`` |
| ``user_embeddings.npy`` | float32 ``(num_users, d)``: the raw user table rows 1..U (the user *token*, an input of the model; not a query vector) |
| ``item_ids.txt``, ``user_ids.txt`` | original ids, one per line, in row order |
| ``items.faiss`` | FAISS ``IndexFlatIP`` over ``item_embeddings.npy`` (faiss's own format, ``faiss.read_index``); only when ``faiss`` imports |
| ``manifest.json`` | ``format_version``, shapes, the checkpoint, the metric, what each file is |

The model scores item ``i`` for a user as ``user_state · E_item[i]`` (inner product, not
cosine; under ``model.item_bias`` plus the item's bias ``b_i``: ``item_embeddings.npy`` then has
one more column holding ``b_i`` and ``user_states.npy`` one more holding 1, so ``dim`` is
``d + 1`` and the inner product is still the whole score), so an inner-product search of ``user_states`` over ``item_embeddings`` returns exactly
the model's top-K (before excluding items the user has seen: filter those out, or ask for K +
history length). A user's raw table row is *not* a query vector. Cold users (a history, no
id) have no precomputed state: ask the service (``POST /recommend`` with ``history``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LLMRecError
from ..io_utils import atomic_directory, atomic_write_json

EXPORT_FORMAT_VERSION = 1


def _faiss():
    """``faiss`` when installed (the ``faiss`` extra), else None."""
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    return faiss


def export_embeddings(
    checkpoint: str | Path,
    output: str | Path,
    faiss_index: bool = True,
    data_dir: str | Path | None = None,
    batch_size: int = 1024,
    allow_new_events: bool = False,
) -> dict[str, Any]:
    """Write item vectors, user query vectors, id maps and a FAISS index to ``output``.

    Args:
        checkpoint: a checkpoint folder (``best_model/``).
        output: destination folder (replaced as a whole, atomically).
        faiss_index: also write ``items.faiss`` when ``faiss`` is installed.
        data_dir: processed data folder (users' histories); default: the checkpoint's.
        batch_size: users per forward pass for ``user_states.npy``.
        allow_new_events: accept a processed folder other than the training one if its id maps
            are the model's (see ``Recommender.from_checkpoint``).

    Returns:
        the manifest written to ``manifest.json``.
    """
    from .recommend import Recommender

    if batch_size < 1:
        raise LLMRecError(f"--batch-size {batch_size}: must be >= 1")
    began = time.perf_counter()
    recommender = Recommender.from_checkpoint(
        Path(checkpoint), Path(data_dir) if data_dir else None, allow_new_events=allow_new_events
    )
    model = recommender.model
    item_vectors = recommender.item_table[1:].cpu().numpy().astype(np.float32)  # (I, d)
    user_vectors = model.embeddings.user_embeddings.weight.detach()[1:].float().cpu().numpy()  # (U, d)
    user_states = recommender.user_states(np.arange(1, recommender.num_users + 1), batch_size)  # (U, d)
    faiss = _faiss() if faiss_index else None
    if faiss_index and faiss is None:
        note = "faiss not installed (pip install 'llm_recommender[faiss]'): no items.faiss written"
        print(f"note: {note}")
    elif not faiss_index:
        note = "items.faiss not requested (--no-faiss)"
    else:
        note = None
    files = {
        "item_embeddings.npy": "float32 (num_items, dim); row r is item index r+1 (line r+1 of item_ids.txt)",
        "user_states.npy": "float32 (num_users, dim); the query vector of user r+1: model.user_state over the "
        "user's history; inner product with item_embeddings = the model's scores",
        "user_embeddings.npy": "float32 (num_users, d); raw user table rows 1..U (model input, not a query "
        "vector; d = dim, or dim - 1 with item_bias)",
        "item_ids.txt": "original item ids in row order",
        "user_ids.txt": "original user ids in row order",
    }
    output = Path(output)
    with atomic_directory(output) as tmp:
        np.save(tmp / "item_embeddings.npy", np.ascontiguousarray(item_vectors))
        np.save(tmp / "user_states.npy", np.ascontiguousarray(user_states))
        np.save(tmp / "user_embeddings.npy", np.ascontiguousarray(user_vectors))
        data_path = Path(recommender.data.path)
        for name in ("item_ids.txt", "user_ids.txt"):
            shutil.copyfile(data_path / name, tmp / name)
        knn = getattr(model, "item_knn", None)
        if knn is not None and model.item_knn_weight:
            knn.save(tmp / "item_knn.safetensors")
            files["item_knn.safetensors"] = (
                f"item co-occurrence neighbours this model fuses into its scores with weight "
                f"{model.item_knn_weight:g}: score = user_state . item_embedding + weight * sum_k "
                f"decay**k * sim(k-th most recent history item, item); keys src*(num_items+1)+dst "
                f"(1-based item indices), values sim; the inner products above are the neural part only"
            )
        if faiss is not None:
            index = faiss.IndexFlatIP(item_vectors.shape[1])
            index.add(np.ascontiguousarray(item_vectors))
            faiss.write_index(index, str(tmp / "items.faiss"))
            files["items.faiss"] = "faiss IndexFlatIP over item_embeddings.npy (faiss.read_index); id = row"
        manifest = {
            "format_version": EXPORT_FORMAT_VERSION,
            "checkpoint": str(Path(checkpoint).resolve()),
            "data_dir": str(data_path),
            "num_items": int(item_vectors.shape[0]),
            "num_users": int(user_states.shape[0]),
            "dim": int(item_vectors.shape[1]),
            "metric": "inner_product",
            # model.item_bias: the last column of item_embeddings.npy is each item's bias and
            # that of user_states.npy is 1 (the inner product is still the model's score).
            "item_bias": bool(getattr(model, "item_bias", None) is not None),
            "max_seq_len": recommender.max_seq_len,
            "query": "user_states.npy (model.user_state), not user_embeddings.npy",
            "files": files,
            "faiss": faiss is not None,
        }
        if knn is not None and model.item_knn_weight:
            manifest["item_knn"] = {"weight": model.item_knn_weight, "history": knn.history,
                                    "decay": knn.decay, **knn.info}
        if note:
            manifest["note"] = note
        atomic_write_json(tmp / "manifest.json", manifest)
    print(
        f"exported {manifest['num_items']} items and {manifest['num_users']} users (dim {manifest['dim']}) "
        f"to {output} in {time.perf_counter() - began:.1f} s" + (" with items.faiss" if faiss is not None else "")
    )
    return manifest
