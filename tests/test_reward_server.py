"""The POLAR reward-model client against a real HTTP server on 127.0.0.1 that this test starts: good scores,
a server slower than the timeout, HTTP 500, garbage JSON, NaN scores, a refused connection, and the circuit
breaker in front of a server that keeps failing."""
import http.server
import json
import socket
import threading
import time

import pytest

import rewards

FAST = dict(reward_model_timeout=0.2, reward_model_retries=1, reward_model_backoff=0.01)


class PoolingHandler(http.server.BaseHTTPRequestHandler):
    """A vLLM /pooling stand-in. The score of a text is the number of times "good" appears in the candidate
    (after <|reward|>); the path picks a behaviour."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        if self.path == "/slow":
            time.sleep(0.6)
        if self.path == "/error" or (self.path == "/flaky" and self.server.flaky_fails):
            self.send_error(500, "model crashed")
            return
        scores = [float(text.split("<|reward|>")[1].count("good")) for text in body["input"]]
        if self.path == "/nan":
            scores[0] = float("nan")
        rows = [{"index": i, "object": "pooling", "data": [[-9.0], [s]]} for i, s in enumerate(scores)]
        if self.path == "/flat":
            rows = [{"index": i, "object": "pooling", "data": [-9.0, s]} for i, s in enumerate(scores)]
        payload = b"{not json" if self.path == "/garbage" else json.dumps({"data": rows}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PoolingHandler)
    httpd.daemon_threads = True
    httpd.requests = []
    httpd.flaky_fails = True  # /flaky answers 500 while this is true, like /pooling otherwise
    httpd.handle_error = lambda request, address: None  # the slow handler writes to a client that gave up
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server, path):
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def item(output, problem_id, reference="a good answer", problem="Describe it."):
    return {"response": f"<think>hm</think><answer>{output}</answer>", "ground_truth": f"<answer>{reference}</answer>",
            "problem_type": "open-ended", "data_type": "video", "problem": problem, "problem_id": problem_id}


@pytest.fixture(autouse=True)
def clean(server):
    server.requests.clear()
    rewards.pop_counters()
    rewards._BREAKERS.clear()


def test_good_scores_are_normalised_per_problem_id(server):
    items = [item("good", 1), item("good good", 1), item("good good good good", 1),  # raw 1, 2, 4
             item("good", 2),  # a group of one has no spread: 1
             item("good", 3), item("also good", 3),  # equal scores: 1 each
             {"response": "<think>x</think><answer>B</answer>", "ground_truth": "B",
              "problem_type": "multiple choice", "data_type": "image", "problem_id": 1}]
    results = rewards.compute_score(items, reward_model_url=url(server, "/pooling"), reward_model_batch_size=4,
                                    reward_model_name="polar-test", **FAST)
    expected = [0.0, 1 / 3, 1.0, 1.0, 1.0, 1.0]
    assert [r["accuracy"] for r in results[:6]] == pytest.approx(expected, abs=1e-6)
    for r, a in zip(results, expected):
        assert r["overall"] == pytest.approx(0.9 * a + 0.1 + 0.5)
    assert results[6] == {"overall": 1.5, "format": 1.0, "accuracy": 1.0, "structure_reward": 0.5}
    # two batches of at most 4 open-ended items, in the POLAR text format, the answer without its tags
    assert [len(body["input"]) for _, body in server.requests] == [4, 2]
    assert server.requests[0][1]["model"] == "polar-test"
    assert server.requests[0][1]["input"][1] == \
        "Describe it.\na good answer<|reward|>Describe it.\ngood good[UNUSED_TOKEN_130]"
    assert rewards.pop_counters() == {"rm_batches": 2}


def test_flat_pooling_rows(server):
    scores = rewards.request_rewards(url(server, "/flat"), ["x<|reward|>good", "x<|reward|>good good"], timeout=0.2)
    assert scores == [1.0, 2.0]


def fallback_check(server, path, attempts, retries=1):
    # one group: the exact answer has ROUGE 1, the other 0.5 -> min-max normalised to 1 and 0
    items = [item("a good answer", 7), item("good", 7)]
    results = rewards.compute_score(items, reward_model_url=url(server, path),
                                    **{**FAST, "reward_model_retries": retries})
    assert [r["accuracy"] for r in results] == pytest.approx([1.0, 0.0], abs=1e-6)
    assert rewards.pop_counters() == {"rm_batches": 1, "rm_failed_batches": 1, "rm_fallback_items": 2,
                                      "rm_retries": retries}
    assert len(server.requests) == attempts


def test_slower_than_timeout_falls_back_to_rouge(server):
    start = time.monotonic()
    fallback_check(server, "/slow", attempts=2)
    assert time.monotonic() - start < 5  # two 0.2 s timeouts, not the server's delay per attempt to the end


def test_http_500_falls_back_to_rouge(server):
    fallback_check(server, "/error", attempts=3, retries=2)


def test_garbage_json_falls_back_to_rouge(server):
    fallback_check(server, "/garbage", attempts=2)


def test_nan_score_falls_back_to_rouge(server):
    fallback_check(server, "/nan", attempts=2)


def test_refused_connection_falls_back_to_rouge(server):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    items = [item("a good answer", 7), item("good", 7)]
    results = rewards.compute_score(items, reward_model_url=f"http://127.0.0.1:{port}/pooling", **FAST)
    assert [r["accuracy"] for r in results] == pytest.approx([1.0, 0.0], abs=1e-6)
    assert rewards.pop_counters()["rm_fallback_items"] == 2
    with pytest.raises(RuntimeError, match="failed 2 times"):
        rewards.request_rewards(f"http://127.0.0.1:{port}/pooling", ["x"], timeout=0.2, retries=1, backoff=0.01)


def test_reward_model_is_off_by_default(server):
    result = rewards.compute_score([item("a good answer", 1)])[0]
    assert result["accuracy"] == 1.0 and server.requests == [] and rewards.pop_counters() == {}


def test_normalize_by_group():
    assert rewards.normalize_by_group([1.0, 2.0, 4.0, 5.0, 5.0, -3.0], ["a", "a", "a", None, None, 0]) == \
        pytest.approx([0.0, 1 / 3, 1.0, 1.0, 1.0, 1.0], abs=1e-6)


def test_circuit_breaker_stops_calling_a_failing_server_until_the_cooldown(server, capsys):
    """reward_model_breaker=2: two failed batches in a row open the breaker, the next batches go straight to ROUGE
    (counted, and printed); after the cooldown one batch tries the server again, and a success closes it."""
    items = [item("a good answer", i) for i in range(4)]  # 4 groups of one, one batch each
    flaky = url(server, "/flaky")
    args = dict(reward_model_url=flaky, reward_model_batch_size=1, reward_model_breaker=2,
                reward_model_cooldown=3600.0, **FAST)
    results = rewards.compute_score(items, **args)
    assert [r["accuracy"] for r in results] == [1.0] * 4  # ROUGE, normalised within each group of one
    assert len(server.requests) == 2 * 2  # batches 1 and 2, each tried twice (1 retry); 3 and 4 never sent
    assert rewards.pop_counters() == {"rm_batches": 4, "rm_failed_batches": 2, "rm_retries": 2,
                                      "rm_fallback_items": 4, "rm_breaker_items": 2}
    out = capsys.readouterr().out
    assert f"reward model at {flaky} failed 2 times" in out and "1 items scored by ROUGE" in out
    assert f"reward model at {flaky}: 2 batches failed in a row; not called for 3600 s" in out

    server.flaky_fails = False
    rewards.compute_score(items, **args)
    assert len(server.requests) == 4  # still open: nothing sent
    rewards._BREAKERS[flaky]["open_until"] = 0.0  # the cooldown has passed
    rewards.compute_score(items, **args)
    assert len(server.requests) == 4 + 4 and rewards._BREAKERS[flaky]["failures"] == 0  # closed again
    server.flaky_fails = True
