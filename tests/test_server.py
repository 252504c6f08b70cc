"""The HTTP service, called over real loopback HTTP.

``served`` starts ``llmrec serve`` as a subprocess on a free port (``--port 0``; the URL is
read from its startup line) and every test talks to it with httpx. A second server with other
settings runs in a thread (uvicorn.Server over ``create_app``), also over loopback HTTP.
"""

from __future__ import annotations

import concurrent.futures
import os
import select
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from test_recommend import build_tiny_checkpoint  # noqa: E402  (tests/ is on sys.path)

from llm_recommender.serving.recommend import Recommender

MAX_K = 50
MAX_HISTORY = 20


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny_serving_checkpoint")


@pytest.fixture(scope="module")
def recommender(tiny_checkpoint) -> Recommender:
    return Recommender.from_checkpoint(tiny_checkpoint[0])


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    """(base URL, process) of ``llmrec serve`` on 127.0.0.1, any free port."""
    checkpoint, _ = tiny_checkpoint
    command = [
        sys.executable, "-m", "llm_recommender.cli", "serve", "--checkpoint", str(checkpoint),
        "--host", "127.0.0.1", "--port", "0",
        "--set", f"serving.max_k={MAX_K}", "--set", f"serving.max_history={MAX_HISTORY}",
        "--set", "serving.max_body_bytes=100000",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = _read_line(process, timeout=120)
    assert line.startswith("llmrec serve: http://127.0.0.1:"), line
    url = line.split()[2]
    _wait_healthy(url)
    yield url, process
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    stderr = process.stderr.read()
    assert "Traceback" not in stderr, stderr  # no request crashed the server


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}: {process.stderr.read()}")
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            return process.stdout.readline().strip()
    raise AssertionError("server printed no startup line")


def _wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"{url}/health never answered")


@pytest.fixture(scope="module")
def client(served):
    url, _ = served
    with httpx.Client(base_url=url, timeout=30) as http:
        yield http


# ------------------------------------------------------------------------------ good requests


def test_known_user_gets_k_unseen_items_sorted_like_the_model(client, recommender):
    response = client.post("/recommend", json={"user_id": "u3", "k": 5})
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    user = recommender.user_to_index("u3")
    expected_items, expected_scores = recommender.recommend_users(np.array([user]), 5)
    assert [item["item_id"] for item in items] == [recommender.item_ids[i - 1] for i in expected_items[0]]
    np.testing.assert_allclose([item["score"] for item in items], expected_scores[0], rtol=1e-5)
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True) and len(items) == 5
    seen = {recommender.item_ids[i - 1] for i in recommender.history_of(user)}
    assert seen.isdisjoint(item["item_id"] for item in items)

    kept = client.post("/recommend", json={"user_id": "u3", "k": 30, "exclude_seen": False}).json()["items"]
    assert seen <= {item["item_id"] for item in kept}  # 30 items = the whole catalogue


def test_new_user_history(client, recommender):
    response = client.post("/recommend", json={"history": ["i5", "i6", "i7"], "k": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    indices, _ = recommender.history_to_indices(["i5", "i6", "i7"])
    expected, _ = recommender.recommend_history(indices, 4)
    assert [item["item_id"] for item in body["items"]] == [recommender.item_ids[i - 1] for i in expected]
    assert "ignored_items" not in body
    # Integer ids are accepted and read as strings.
    numeric = client.post("/recommend", json={"history": ["i5", 12345], "k": 2}).json()
    assert numeric["ignored_items"] == ["12345"]


def test_batch_answers_in_request_order(client):
    requests = [{"user_id": "u1", "k": 3}, {"history": ["i2", "i3"], "k": 2}, {"user_id": "u2"}]
    response = client.post("/recommend/batch", json={"requests": requests})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [len(result["items"]) for result in results] == [3, 2, 10]  # default_k = 10
    for request, result in zip(requests, results):
        alone = client.post("/recommend", json=request).json()
        assert [item["item_id"] for item in result["items"]] == [item["item_id"] for item in alone["items"]]


def test_similar_items(client, recommender):
    response = client.get("/items/i4/similar", params={"k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    expected, _ = recommender.similar_items(recommender.item_to_index("i4"), 3)
    assert body["item_id"] == "i4"
    assert [item["item_id"] for item in body["items"]] == [recommender.item_ids[i - 1] for i in expected]


def test_health_and_openapi(client, tiny_checkpoint):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["num_users"] == 60 and health["num_items"] == 30
    assert health["checkpoint"] == str(tiny_checkpoint[0]) and health["max_k"] == MAX_K
    schema = client.get("/openapi.json").json()
    assert {"/recommend", "/recommend/batch", "/items/{item_id}/similar", "/health"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


# ------------------------------------------------------------------------------ bad requests


def _post_raw(client, path: str, content: bytes):
    return client.post(path, content=content, headers={"content-type": "application/json"})


BAD_REQUESTS = [
    # (name, method, path, json body or raw bytes, expected status, expected text in detail)
    ("unknown user", "post", "/recommend", {"user_id": "nobody"}, 404, "unknown user_id 'nobody'"),
    ("unknown item in similar", "get", "/items/nope/similar", None, 404, "unknown item_id 'nope'"),
    ("malformed JSON", "post", "/recommend", b'{"user_id": "u1", "k": ', 422, "malformed JSON"),
    ("not UTF-8", "post", "/recommend", b'{"user_id": "\xff\xfe"}', 422, "malformed JSON"),
    ("nested too deep", "post", "/recommend", b"[" * 50000, 422, "malformed JSON"),
    ("JSON not an object", "post", "/recommend", b"[1, 2]", 422, "body"),
    ("missing fields", "post", "/recommend", {"k": 5}, 422, "give exactly one of user_id or history"),
    ("both fields", "post", "/recommend", {"user_id": "u1", "history": ["i1"]}, 422, "exactly one"),
    ("extra field", "post", "/recommend", {"user_id": "u1", "kk": 5}, 422, "body.kk: Extra inputs"),
    ("k zero", "post", "/recommend", {"user_id": "u1", "k": 0}, 422, "body.k: Input should be greater than or equal to 1"),
    ("k negative", "post", "/recommend", {"user_id": "u1", "k": -3}, 422, "body.k"),
    ("k above max", "post", "/recommend", {"user_id": "u1", "k": MAX_K + 1}, 422, f"less than or equal to {MAX_K}"),
    ("k huge", "post", "/recommend", {"user_id": "u1", "k": 10**30}, 422, "body.k"),
    ("k not a number", "post", "/recommend", {"user_id": "u1", "k": "ten"}, 422, "body.k"),
    ("similar k above max", "get", f"/items/i1/similar?k={MAX_K + 1}", None, 422, "query.k"),
    ("history too long", "post", "/recommend", {"history": ["i1"] * (MAX_HISTORY + 1)}, 422, f"at most {MAX_HISTORY} items"),
    ("empty history", "post", "/recommend", {"history": []}, 422, "body.history"),
    ("history of nulls", "post", "/recommend", {"history": [None]}, 422, "body.history.0"),
    ("history all unknown", "post", "/recommend", {"history": ["x1", "x2"]}, 422, "none of its 2 item ids is known"),
    ("batch entry unknown", "post", "/recommend/batch", {"requests": [{"user_id": "u1"}, {"user_id": "zz"}]}, 404, "requests[1]: unknown user_id 'zz'"),
    ("batch empty", "post", "/recommend/batch", {"requests": []}, 422, "body.requests"),
    ("huge body", "post", "/recommend", {"history": ["i1"] * 30000}, 413, "larger than 100000 bytes"),
]


@pytest.mark.parametrize("name,method,path,body,status,text", BAD_REQUESTS, ids=[row[0] for row in BAD_REQUESTS])
def test_bad_request_gets_4xx_with_a_clear_message(client, name, method, path, body, status, text):
    if method == "get":
        response = client.get(path)
    elif isinstance(body, bytes):
        response = _post_raw(client, path, body)
    else:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    assert text in detail, detail
    assert len(response.content) < 5000  # never echoes a large input back


def test_history_with_unknown_items_is_answered_and_lists_them(client):
    response = client.post("/recommend", json={"history": ["i1", "ghost", "i2", "ghost2"], "k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ignored_items"] == ["ghost", "ghost2"] and len(body["items"]) == 3


def test_chunked_body_over_the_limit_is_413(served):
    url, _ = served

    def chunks():
        for _ in range(30):
            yield b" " * 10000  # 300 KB without a Content-Length header

    response = httpx.post(f"{url}/recommend", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413


def test_mixed_concurrent_load_has_no_5xx_and_server_stays_up(served):
    """Issue 7 in small: good and bad requests from 20 threads at once."""
    url, process = served
    bodies = [
        ({"user_id": "u1", "k": 5}, 200), ({"history": ["i1", "i2"]}, 200), ({"user_id": "ghost"}, 404),
        ({"user_id": "u2", "k": 0}, 422), (b"{oops", 422), ({"history": ["i1"] * 30000}, 413),
        ({"requests": [{"user_id": "u3"}] * 5}, 200),
    ]
    statuses: list[tuple[int, int]] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for step in range(15):
                body, expected = bodies[(seed + step) % len(bodies)]
                path = "/recommend/batch" if isinstance(body, dict) and "requests" in body else "/recommend"
                if isinstance(body, bytes):
                    got = http.post(path, content=body, headers={"content-type": "application/json"}).status_code
                else:
                    got = http.post(path, json=body).status_code
                with lock:
                    statuses.append((got, expected))

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(worker, range(20)))
    assert len(statuses) == 300
    assert all(got == expected for got, expected in statuses), [s for s in statuses if s[0] != s[1]][:5]
    assert process.poll() is None
    health = httpx.get(f"{url}/health").json()
    # Concurrent requests shared forward passes (the micro-batcher gathered them).
    assert health["queries_scored"] > health["forward_passes"]


# ------------------------------------------------------------------------------ other settings


@pytest.fixture
def threaded_server(recommender):
    """Start ``create_app`` under uvicorn in a thread on a free loopback port."""
    import uvicorn

    from llm_recommender.config import ServingConfig
    from llm_recommender.serving.server import bind_socket, create_app

    servers = []

    def start(**settings) -> str:
        app = create_app(recommender, ServingConfig(**settings))
        sock = bind_socket("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread, sock))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        _wait_healthy(url)
        return url

    yield start
    for server, thread, sock in servers:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_unknown_history_items_can_be_an_error(threaded_server):
    url = threaded_server(unknown_items="error", batch_window_ms=0)
    response = httpx.post(f"{url}/recommend", json={"history": ["i1", "ghost"]})
    assert response.status_code == 404
    assert response.json()["detail"] == "unknown item_id 'ghost' in history"
    assert httpx.post(f"{url}/recommend", json={"history": ["i1"]}).status_code == 200


def test_busy_port_is_a_one_line_error(tiny_checkpoint, capsys):
    import torch

    from llm_recommender.cli import main

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    threads = torch.get_num_threads()
    try:
        code = main(["serve", "--checkpoint", str(tiny_checkpoint[0]), "--port", str(busy.getsockname()[1])])
    finally:
        busy.close()
        torch.set_num_threads(threads)
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: Address already in use"


def test_a_bug_is_a_generic_500_and_the_server_keeps_serving(threaded_server, recommender, monkeypatch, caplog):
    url = threaded_server(batch_window_ms=0)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(recommender, "score_histories", broken)
    response = httpx.post(f"{url}/recommend", json={"user_id": "u1"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error (logged by the server)"}
    assert "simulated bug" not in response.text
    monkeypatch.undo()
    assert httpx.post(f"{url}/recommend", json={"user_id": "u1"}).status_code == 200


def test_known_users_are_served_averaged_over_tied_orders_as_recommend_users(threaded_server, recommender, monkeypatch):
    # Every user's events in pairs of one timestamp, scored over 8 orders of each pair.
    monkeypatch.setattr(recommender, "timestamps", np.arange(len(recommender.items)) // 2)
    monkeypatch.setattr(recommender, "tied_orders", 8)
    url = threaded_server(batch_window_ms=0)
    users = np.arange(1, 6)
    items, scores = recommender.recommend_users(users, k=5)
    monkeypatch.setattr(recommender, "tied_orders", 1)
    _, plain = recommender.recommend_users(users, k=5)
    monkeypatch.setattr(recommender, "tied_orders", 8)
    assert not np.allclose(scores, plain)  # the orders change the scores
    history = [recommender.item_ids[i - 1] for i in recommender.history_of(1)]
    response = httpx.post(
        f"{url}/recommend/batch",
        json={"requests": [{"user_id": recommender.user_ids[u - 1], "k": 5} for u in users] + [{"history": history, "k": 5}]},
    )
    assert response.status_code == 200
    results = response.json()["results"]
    for row, result in enumerate(results[:5]):
        assert [entry["item_id"] for entry in result["items"]] == [recommender.item_ids[i - 1] for i in items[row]]
        np.testing.assert_allclose([entry["score"] for entry in result["items"]], scores[row], rtol=1e-5)
    cold, cold_scores = recommender.recommend_history(recommender.history_of(1), k=5)  # no timestamps: one order
    assert [entry["item_id"] for entry in results[5]["items"]] == [recommender.item_ids[i - 1] for i in cold]
    np.testing.assert_allclose([entry["score"] for entry in results[5]["items"]], cold_scores, rtol=1e-5)
