"""The HTTP service: FastAPI + uvicorn over one :class:`~.recommend.Recommender`.

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``):

- ``POST /recommend``: ``{"user_id": ID, "k": 10, "exclude_seen": true}`` or
  ``{"history": [ID, ...], "k": 10, "exclude_seen": true}`` →
  ``{"items": [{"item_id": ID, "score": float}, ...]}`` (best first, original ids). A history
  is scored as a cold user (user index 0, see ``recommend.py``); unknown history items are
  dropped and listed under ``"ignored_items"`` (``serving.unknown_items: ignore``) or are a 404
  (``error``).
- ``POST /recommend/batch``: ``{"requests": [<as /recommend>, ...]}`` → ``{"results": [...]}``
  in request order (at most ``serving.max_batch_users``; one bad entry fails the whole batch
  with a message naming its position).
- ``GET /items/{item_id}/similar?k=10``: nearest items by cosine of the item embeddings.
- ``GET /health``: checkpoint, data folder and catalogue sizes.

Errors are 4xx with ``{"detail": "<one line>"}``: unknown user or item → 404; malformed JSON,
missing or extra fields, ``k`` outside ``1..serving.max_k``, a history longer than
``serving.max_history`` or with no known item → 422; a body over ``serving.max_body_bytes`` →
413. A 500 would be a bug: it is logged and answered with a generic message, and the server
keeps running.

Concurrency: one model thread. Requests are queued to a micro-batcher that takes every
request waiting, runs one forward pass for all of them in the model thread, and resolves each
request's future. The event loop only parses, maps ids and serialises, so concurrent requests
never touch the model at the same time and share forward passes under load. When the previous
pass held more than one request (there is concurrency), the batcher first waits
``serving.batch_window_ms`` for more; a lone client never waits. Measured on 2 shared cores
(benchmarks/serve_latency.py): the window cut p99 at 20 clients from 56-450 ms to 34-55 ms;
running the model in the event loop thread instead of a worker thread was no better.
"""

# No ``from __future__ import annotations``: FastAPI must resolve the request models defined
# inside create_app from the endpoint annotations at runtime.

import asyncio
import contextlib
import json
import logging
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, Sequence, Union

import numpy as np

from ..errors import one_line
from .recommend import Recommender, UnknownIdError

if TYPE_CHECKING:  # fastapi is imported lazily: `llmrec` starts fast without it
    from fastapi import FastAPI

logger = logging.getLogger("llm_recommender.serving")

#: Most queries scored in one forward pass of the micro-batcher.
MAX_QUERIES_PER_PASS = 256


# ------------------------------------------------------------------------------ micro-batcher


@dataclass
class _Job:
    """Queries from one HTTP request, resolved together by one future."""

    kind: str  # "recommend" or "similar"
    users: np.ndarray  # (n,) user indices (0: cold history); for "similar": item indices
    histories: list[np.ndarray] = field(default_factory=list)  # item indices per query
    exclude_seen: list[bool] = field(default_factory=list)
    k: int = 10
    stamps: list[Optional[np.ndarray]] = field(default_factory=list)  # a known user's timestamps; None: cold
    future: Optional[asyncio.Future] = None

    @property
    def size(self) -> int:
        return len(self.users)


class MicroBatcher:
    """Gathers concurrent requests into forward passes run in one model thread.

    Args:
        recommender: the loaded model.
        window_ms: after the first waiting request, how long to wait for more (0: take what is
            queued and go).
        max_queries: most queries per forward pass.
    """

    def __init__(self, recommender: Recommender, window_ms: float, max_queries: int = MAX_QUERIES_PER_PASS) -> None:
        self.recommender = recommender
        self.window_s = float(window_ms) / 1000.0
        self.max_queries = int(max_queries)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmrec-model")
        self.queue: asyncio.Queue[_Job] | None = None
        self.task: asyncio.Task | None = None
        self.passes = 0
        self.queries = 0
        self.last_pass_size = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop(), name="llmrec-micro-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=True)

    async def submit(self, job: _Job) -> list[tuple[np.ndarray, np.ndarray]]:
        """Queue a job; returns one (items, scores) pair per query, in order."""
        job.future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(job)
        return await job.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size = jobs[0].size
            if self.window_s > 0 and self.last_pass_size > 1:
                # Only under concurrency: a lone client would wait the window for nothing.
                await asyncio.sleep(self.window_s)
            while size < self.max_queries and not self.queue.empty():
                job = self.queue.get_nowait()
                jobs.append(job)
                size += job.size
            jobs = [job for job in jobs if not job.future.done()]  # clients that went away
            self.last_pass_size = size
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self._run, jobs)
            except Exception as exc:  # a bug in scoring: fail these requests (HTTP 500), keep serving
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)

    def _run(self, jobs: list[_Job]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """In the model thread: score every query of ``jobs`` in as few passes as fit."""
        self.passes += 1
        results: list[list[tuple[np.ndarray, np.ndarray]] | None] = [None] * len(jobs)
        recommend = [i for i, job in enumerate(jobs) if job.kind == "recommend"]
        similar = [i for i, job in enumerate(jobs) if job.kind == "similar"]
        rec = self.recommender
        if recommend:
            users = np.concatenate([jobs[i].users for i in recommend])
            histories = [h for i in recommend for h in jobs[i].histories]
            # Timestamps let a known user's tied events be read in several orders (the model's
            # evaluation.tied_orders); a cold history's events are taken as distinct.
            stamps = [
                np.arange(len(h)) if t is None else t
                for i in recommend
                for h, t in zip(jobs[i].histories, jobs[i].stamps or [None] * len(jobs[i].histories))
            ]
            exclude = np.array([e for i in recommend for e in jobs[i].exclude_seen], dtype=bool)
            k = max(jobs[i].k for i in recommend)
            items_parts, scores_parts = [], []
            step = rec.users_per_chunk()
            for start in range(0, len(users), step):
                part = histories[start : start + step]
                items, scores = rec.score_histories(
                    users[start : start + step],
                    np.concatenate(part),
                    np.array([len(h) for h in part]),
                    k,
                    exclude[start : start + step],
                    np.concatenate(stamps[start : start + step]),
                )
                items_parts.append(items)
                scores_parts.append(scores)
            all_items, all_scores = np.concatenate(items_parts), np.concatenate(scores_parts)
            self.queries += len(users)
            row = 0
            for i in recommend:
                job = jobs[i]
                results[i] = [
                    (all_items[r, : job.k], all_scores[r, : job.k]) for r in range(row, row + job.size)
                ]
                row += job.size
        if similar:
            queries = np.concatenate([jobs[i].users for i in similar])
            k = max(jobs[i].k for i in similar)
            items, scores = rec.similar_items_batch(queries, k)
            row = 0
            for i in similar:
                job = jobs[i]
                results[i] = [(items[r, : job.k], scores[r, : job.k]) for r in range(row, row + job.size)]
                row += job.size
        return results


# ------------------------------------------------------------------------------ body limit


class BodyLimitMiddleware:
    """Reject request bodies over ``max_bytes`` with 413, by header and by counting the stream.

    The body is read here (at most ``max_bytes`` kept) and replayed to the app, so a chunked
    upload without Content-Length cannot grow memory past the limit either. An oversized body
    is read and discarded before answering (up to ``drain_factor`` x the limit, like nginx's
    lingering close): answering while the client still sends makes the kernel reset the
    connection, and the client would see a reset instead of the 413.
    """

    def __init__(self, app, max_bytes: int, drain_factor: int = 64) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.drain_limit = int(max_bytes) * int(drain_factor)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.drain_limit:
                await self._too_large(send, close=True)  # not worth reading at all
                return
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            more = bool(message.get("more_body", False))
            total += len(body)
            if total > self.max_bytes:
                chunks = []
                while more and total <= self.drain_limit:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    total += len(message.get("body", b""))
                    more = bool(message.get("more_body", False))
                await self._too_large(send, close=more)
                return
            chunks.append(body)
        buffered = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": buffered, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send, close: bool) -> None:
        body = (
            f'{{"detail":"request body larger than {self.max_bytes} bytes (serving.max_body_bytes)"}}'
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------ the app


def _validation_detail(errors: Sequence[dict[str, Any]]) -> str:
    """One line from pydantic errors: ``body.k: Input should be less than or equal to 1000``."""
    parts = []
    for error in errors[:5]:
        if error.get("type") == "json_invalid":
            position = error.get("loc", ("body", "?"))[-1]
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            parts.append(f"malformed JSON at character {position}: {reason}")
            continue
        location = ".".join(str(part) for part in error.get("loc", ()))
        message = str(error.get("msg", "invalid"))
        parts.append(f"{location}: {message}" if location else message)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return one_line("; ".join(parts) + more)


def create_app(recommender: Recommender, serving_config) -> "FastAPI":
    """Build the FastAPI app over a loaded recommender.

    Args:
        recommender: the loaded model and data (shared by all requests).
        serving_config: ``config.serving`` (limits, ``unknown_items``, ``batch_window_ms``).

    Returns:
        the ASGI app (body-size limit included).
    """
    from fastapi import FastAPI, HTTPException, Path as PathParam, Query, Request
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

    settings = serving_config
    batcher = MicroBatcher(recommender, settings.batch_window_ms)
    Id = Union[StrictStr, StrictInt]

    class RecommendRequest(BaseModel):
        """A known user (``user_id``) or a cold user (``history``, oldest first)."""

        model_config = ConfigDict(extra="forbid")
        user_id: Optional[Id] = Field(None, description="original user id of a known user")
        history: Optional[list[Id]] = Field(
            None,
            min_length=1,
            max_length=settings.max_history,
            description="original item ids, oldest first (a user the model has not seen)",
        )
        k: int = Field(settings.default_k, ge=1, le=settings.max_k, description="number of items")
        exclude_seen: bool = Field(True, description="leave out items already in the history")

        @model_validator(mode="after")
        def _one_of(self):
            if (self.user_id is None) == (self.history is None):
                raise ValueError("give exactly one of user_id or history")
            return self

    class BatchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        requests: list[RecommendRequest] = Field(..., min_length=1, max_length=settings.max_batch_users)

    class ScoredItem(BaseModel):
        item_id: str
        score: float

    class RecommendResponse(BaseModel):
        items: list[ScoredItem]
        ignored_items: Optional[list[str]] = Field(
            None, description="unknown history items that were dropped (serving.unknown_items: ignore)"
        )

    class BatchResponse(BaseModel):
        results: list[RecommendResponse]

    class SimilarResponse(BaseModel):
        item_id: str
        items: list[ScoredItem]

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="llm_recommender",
        description="Top-K sequential recommendations from a trained llm_recommender checkpoint.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.recommender = recommender

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        # The default answer echoes the input back (a 1 MB body echoed is a 1 MB error).
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": _validation_detail(exc.errors()), "errors": errors[:20]})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI answers a body json.loads cannot even start on (not UTF-8, nested thousands
        # of levels deep) with 400 "There was an error parsing the body": it is malformed JSON
        # like any other, so 422 with the reason.
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, (UnicodeDecodeError, RecursionError)):
            reason = "not valid UTF-8" if isinstance(cause, UnicodeDecodeError) else "nested too deeply"
            return JSONResponse(status_code=422, content={"detail": f"malformed JSON: {reason}"})
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(status_code=500, content={"detail": "internal error (logged by the server)"})

    def _query(request: RecommendRequest, where: str = "") -> tuple[int, np.ndarray, list[str], Optional[np.ndarray]]:
        """A request → (user index, history indices, ignored ids, the history's timestamps or
        None for a cold history); 404/422 on bad ids."""
        try:
            if request.user_id is not None:
                user = recommender.user_to_index(request.user_id)
                return user, recommender.history_of(user), [], recommender.timestamps_of(user)
            history, ignored = recommender.history_to_indices(request.history, settings.unknown_items)
        except UnknownIdError as exc:
            raise HTTPException(status_code=404, detail=f"{where}{exc}") from None
        if len(history) == 0:
            raise HTTPException(
                status_code=422,
                detail=one_line(
                    f"{where}history: none of its {len(request.history)} item ids is known to the model "
                    f"(ignored: {', '.join(ignored[:5])}{', ...' if len(ignored) > 5 else ''})"
                ),
            )
        return 0, history, ignored, None

    def _json(body: dict[str, Any]) -> Response:
        # Returned as bytes: the response models above document the schema (OpenAPI); the body
        # is built here from known values, so FastAPI's per-request validation and
        # jsonable_encoder pass is skipped (it is CPU the 2-core budget cannot spare).
        return Response(json.dumps(body, separators=(",", ":")).encode(), media_type="application/json")

    def _response(items: np.ndarray, scores: np.ndarray, ignored: list[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"items": recommender.items_to_ids(items, scores)}
        if ignored:
            body["ignored_items"] = ignored
        return body

    @app.post("/recommend", response_model=RecommendResponse, response_model_exclude_none=True)
    async def recommend(request: RecommendRequest) -> dict[str, Any]:
        """Top-K items for a known user or a cold history."""
        user, history, ignored, stamps = _query(request)
        job = _Job("recommend", np.array([user]), [history], [request.exclude_seen], request.k, [stamps])
        ((items, scores),) = await batcher.submit(job)
        return _json(_response(items, scores, ignored))

    @app.post("/recommend/batch", response_model=BatchResponse, response_model_exclude_none=True)
    async def recommend_batch(batch: BatchRequest) -> dict[str, Any]:
        """Top-K for several users or histories in one call (results in request order)."""
        queries = [_query(request, f"requests[{i}]: ") for i, request in enumerate(batch.requests)]
        job = _Job(
            "recommend",
            np.array([user for user, _, _, _ in queries], dtype=np.int64),
            [history for _, history, _, _ in queries],
            [request.exclude_seen for request in batch.requests],
            max(request.k for request in batch.requests),
            [stamps for _, _, _, stamps in queries],
        )
        results = await batcher.submit(job)
        return _json(
            {
                "results": [
                    _response(items[: request.k], scores[: request.k], ignored)
                    for (items, scores), request, (_, _, ignored, _) in zip(results, batch.requests, queries)
                ]
            }
        )

    @app.get("/items/{item_id:path}/similar", response_model=SimilarResponse)
    async def similar(
        item_id: Annotated[str, PathParam(description="original item id")],
        k: Annotated[int, Query(ge=1, le=settings.max_k, description="number of items")] = settings.default_k,
    ) -> dict[str, Any]:
        """Items nearest to an item by cosine similarity of the item embeddings."""
        try:
            index = recommender.item_to_index(item_id)
        except UnknownIdError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        ((items, scores),) = await batcher.submit(_Job("similar", np.array([index]), k=k))
        return _json({"item_id": item_id, "items": recommender.items_to_ids(items, scores)})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and what is loaded."""
        return {
            "status": "ok",
            "checkpoint": recommender.checkpoint,
            "data_dir": str(recommender.data.path),
            "num_users": recommender.num_users,
            "num_items": recommender.num_items,
            "max_seq_len": recommender.max_seq_len,
            "max_k": settings.max_k,
            "forward_passes": batcher.passes,
            "queries_scored": batcher.queries,
        }

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (``port=0``: a free port, read it from ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP,
    # and without it every response waits ~40 ms (Nagle holds the body segment until the
    # client's delayed ACK of the header segment).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(
    checkpoint: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    config_path: str | None = None,
    allow_new_events: bool = False,
) -> None:
    """``llmrec serve``: load the model once and serve HTTP until interrupted (one worker).

    Prints one line with the URL once the port is bound (``--port 0`` picks a free one).

    Args:
        checkpoint: a checkpoint folder (``best_model/``).
        host: interface to bind (127.0.0.1: this machine only).
        port: TCP port (0: any free port).
        data_dir: processed data folder; default: the one recorded in the checkpoint.
        overrides: ``serving.*`` / ``runtime.*`` ``--set`` strings.
        config_path: a YAML whose ``serving`` and ``runtime`` sections are used instead of the
            checkpoint's.
        allow_new_events: serve from a processed folder other than the training one if its id
            maps are the model's (see ``Recommender.from_checkpoint``).
    """
    import torch
    import uvicorn

    from .recommend import load_settings

    serving, runtime = load_settings(checkpoint, config_path, overrides)
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    recommender = Recommender.from_checkpoint(
        Path(checkpoint), Path(data_dir) if data_dir else None, runtime.device, overrides,
        allow_new_events=allow_new_events,
    )
    app = create_app(recommender, serving)
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    print(
        f"llmrec serve: http://{shown_host}:{bound_port} (docs: /docs) - {recommender.num_users} users, "
        f"{recommender.num_items} items, checkpoint {checkpoint}",
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", workers=1)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    sys.stdout.flush()
