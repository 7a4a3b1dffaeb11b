"""rwkv-torch serve against the real ``openai`` client: a live server (uvicorn in a thread, a tiny byte model) on a
free port; every answer checked against the library's own ``generate`` on the same model."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import pytest
import torch

import rwkv_torch as rt
from rwkv_torch import cli
from rwkv_torch.generate import generate
from rwkv_torch.serve.cache import PrefixCache
from rwkv_torch.serve.scheduler import _held_back
from rwkv_torch.tokenizer import get_tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from rwkv_torch.serve import make_server  # noqa: E402
from rwkv_torch.serve.command import uvicorn_server  # noqa: E402

KEY = "sk-test"
TOK = get_tokenizer("byte")


@pytest.fixture(scope="module")
def model():
    return rt.build(version=7, vocab_size=256, hidden_size=64, num_layers=2, head_size=16, seed=0).eval()


class Live:
    def __init__(self, model, **options):
        self.app, self.sched = make_server(model, TOK, model_name="tiny", **options)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn_server(self.app, "127.0.0.1", self.port)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 20, "the server did not start"
            time.sleep(0.02)

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30, **kw)

    def health(self) -> dict:
        return http(self.port, "GET", "/health")[1]

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(model):
    srv = Live(model, api_key=KEY, max_streams=8, max_prompt_tokens=2000, prefill_chunk=64)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def http(port, method, path, body=None, key=None, raw=None):
    """A plain request (http.client): ``(status, JSON body)``."""
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request(method, path, raw if raw is not None else None if body is None else json.dumps(body), headers)
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def open_stream(port, body, key=None):
    """A streaming request left open after its first event: the connection (close it to disconnect)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), headers)
    r = conn.getresponse()
    assert r.status == 200
    assert r.read1(65536).startswith(b"data: {")
    return conn


def solo(model, text, n, **opts) -> str:
    """The library's answer: ``generate`` on the prompt's bytes, decoded."""
    opts = {"temperature": 0, **opts}
    return TOK.decode(generate(model, TOK.encode(text), max_tokens=n, **opts).tokens[0])


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = live.health()
    assert h["status"] == "ok" and h["model"] == "tiny" and h["max_streams"] == 8


def test_completion_greedy_equals_generate(model, client):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0)
    assert r.choices[0].text == solo(model, "Once upon a time", 24)
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
    n = len(TOK.encode("Once upon a time"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n, 24, n + 24)


def test_streaming_equals_non_streaming(model, client):
    prompt = "The quick brown fox"
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == solo(model, prompt, 20)
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 3
    msgs = [{"role": "user", "content": "hi there"}]
    parts = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant" and parts[-1].usage.completion_tokens <= 16
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    assert text == whole.choices[0].message.content and whole.object == "chat.completion"


def test_chat_is_the_world_template(model, client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\n\nthere"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Why?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0)
    prompt = "System: Be brief.\n\nUser: Hello\nthere\n\nAssistant: Hi.\n\nUser: Why?\n\nAssistant:"
    ref = solo(model, prompt, 20)
    ref = ref.split("\n\nUser:")[0]
    assert r.choices[0].message.content == ref and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(TOK.encode(prompt))


def test_stop_strings(model, client):
    prompt = "Stop here: "
    full = solo(model, prompt, 30)
    stop = full[9:12]  # a piece from the middle; the answer ends right before its first occurrence
    want = full[:full.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "\x00zz"],
                                      stream=stream)
        if stream:
            r = list(r)
            text, finish = "".join(c.choices[0].text for c in r), r[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert (text, finish) == (want, "stop")
    assert _held_back("abc\n\nUs", ["\n\nUser:"]) == 4 and _held_back("abc", ["xyz"]) == 0


def test_seeds_reproducible_and_as_generate(model, client):
    opts = dict(temperature=1.0, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3)
    a, b, c = (client.completions.create(model="tiny", prompt="Seeded", max_tokens=30, seed=s, **opts).choices[0].text
               for s in (5, 5, 6))
    assert a == b != c
    assert a == solo(model, "Seeded", 30, seed=5, penalty_decay=1.0, **opts)


def test_eight_concurrent_streams_each_equal_solo(model, live, client):
    prompts = [f"Stream number {i} says" + "!" * (7 * i) for i in range(8)]
    before = live.health()["steps"]

    def one(p):
        return "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=p, max_tokens=40, temperature=0, stream=True))

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(one, prompts))
    h = live.health()
    assert got == [solo(model, p, 40) for p in prompts]
    assert h["peak_rows"] >= 4 and h["steps"] - before < 8 * 40  # the streams shared steps: batched
    assert h["rows"] == 0


def test_cache_hit_equals_cold_path(model, client):
    prompt = "A long shared system prompt. " * 8  # > 64 tokens: prefilled in chunks, each chunk's state cached
    cold = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    n = len(TOK.encode(prompt))
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    hot = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert hot.choices[0].text == cold.choices[0].text == solo(model, prompt, 16)
    assert hot.usage.prompt_tokens_details.cached_tokens == n - 1
    longer = prompt + "And then?"
    r = client.completions.create(model="tiny", prompt=longer, max_tokens=16, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens >= n  # the state after the whole first prompt
    assert r.choices[0].text == solo(model, longer, 16)


def test_chat_resumes_after_a_shared_system_prompt(model, client):
    system = {"role": "system", "content": "You answer in riddles. " * 6}
    a, b = ([system, {"role": "user", "content": q}] for q in ("Who are you?", "Where am I?"))
    client.chat.completions.create(model="tiny", messages=a, max_tokens=4, temperature=0)
    r = client.chat.completions.create(model="tiny", messages=b, max_tokens=12, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens == len(TOK.encode(f"System: {system['content'].strip()}\n\n"))
    prompt = f"System: {system['content'].strip()}\n\nUser: Where am I?\n\nAssistant:"
    assert r.choices[0].message.content == solo(model, prompt, 12).split("\n\nUser:")[0]


def test_prefix_cache_lru_budget():
    m = rt.build(version=7, vocab_size=256, hidden_size=32, num_layers=1, head_size=16, seed=0)
    s = m.init_state(1)
    size = sum(t.numel() * t.element_size() for t in s.flat())
    cache = PrefixCache(2 * size)
    assert cache.put([1, 2], s) and cache.put([1, 2, 3, 4], s)
    assert cache.longest([1, 2, 3, 4, 5])[0] == 4 and cache.longest([1, 2, 3, 4], limit=3)[0] == 2
    assert cache.longest([9])[0] == 0
    cache.put([7], s)  # over budget: the least recently used ([1, 2, 3, 4] was used last) goes
    assert len(cache) == 2 and cache.longest([1, 2, 3, 4])[0] == 2 and cache.longest([7, 8])[0] == 1
    assert cache.stats()["evictions"] == 1 and cache.bytes == 2 * size


def test_disconnect_mid_stream_frees_the_row(live):
    before = live.health()["cancelled"]
    conn = open_stream(live.port, dict(model="tiny", prompt="Go on forever", max_tokens=100_000), KEY)
    assert live.health()["rows"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    t0 = time.time()
    while (h := live.health())["rows"] or h["prefilling"]:
        assert time.time() - t0 < 10, f"the row was not freed: {h}"
        time.sleep(0.05)
    assert h["cancelled"] == before + 1


def test_bad_requests_and_auth(live, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", temperature=5)
    assert e.value.body["param"] == "temperature" and "must be in" in e.value.body["message"]
    for bad in (dict(top_p=0), dict(max_tokens=0), dict(n=2), dict(presence_penalty=3), dict(stop=[""])):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="x", **bad)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        live.client(key="wrong").completions.create(model="tiny", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x" * 2001)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    status, body = http(live.port, "POST", "/v1/completions", raw=b"{not json", key=KEY)
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert http(live.port, "GET", "/v1/models")[0] == 401 and http(live.port, "GET", "/v2/x", key=KEY)[0] == 404


def test_queue_full_is_429(model):
    srv = Live(model, max_streams=1)
    try:
        conn = open_stream(srv.port, dict(model="tiny", prompt="busy", max_tokens=100_000))
        with pytest.raises(openai.RateLimitError):
            srv.client().completions.create(model="tiny", prompt="x", max_tokens=2)
        conn.close()
    finally:
        srv.stop()


def test_cli_check_and_sigterm(model, tmp_path, capsys):
    rt.save(model, tmp_path / "m")
    assert cli.main(["serve", "--model", str(tmp_path / "m"), "--port", "0", "--check"]) == 0
    assert "binds" in capsys.readouterr().out
    assert cli.main(["serve", "--model", str(tmp_path / "m"), "--port", "0", "--weights", "int8", "--check"]) == 0
    assert "int8 weights" in capsys.readouterr().out
    assert cli.main(["serve", "--model", str(tmp_path / "m"), "--max-streams", "0", "--check"]) == 2
    assert "--max-streams 0: must be >= 1" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tmp_path / "nope"), "--check"]) == 2
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-m", "rwkv_torch.cli", "serve", "--model", str(tmp_path / "m"),
                          "--port", str(port), "--model-name", "m"], env=env, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while True:
            try:
                assert http(port, "GET", "/health")[1]["model"] == "m"
                break
            except OSError:
                assert p.poll() is None and time.time() - t0 < 30, "the server did not come up"
                time.sleep(0.1)
        r = http(port, "POST", "/v1/completions", dict(model="m", prompt="hi", max_tokens=3, temperature=0))[1]
        assert r["choices"][0]["text"] == solo(model, "hi", 3)
        conn = open_stream(port, dict(model="m", prompt="in flight", max_tokens=100_000))  # cancelled after 5 s
        t0 = time.time()
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 128 + signal.SIGTERM  # the CLI's rule (as for training): 143 after SIGTERM
        assert time.time() - t0 < 15
        conn.close()
        with pytest.raises(OSError):
            http(port, "GET", "/health")  # no longer accepting
        assert "stopped (signal 15)" in p.stderr.read().decode()
    finally:
        if p.poll() is None:
            p.kill()


def test_chat_template_override(model, tmp_path):
    from rwkv_torch.serve.command import _template

    t = _template(json.dumps({"roles": {"user": "Q"}, "prompt": "A:", "stop": ["\n\nQ:"]}))
    assert t.render([{"role": "user", "content": "2+2?"}]) == "Q: 2+2?\n\nA:"
    with pytest.raises(ValueError, match="--chat-template"):
        _template('{"nope": 1}')
    assert torch.get_num_threads() >= 1


def test_sample_rows_draws_what_each_row_alone_draws():
    from rwkv_torch.generate import sample, sample_rows

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    opts = [dict(temperature=0.7, top_p=0.9), dict(temperature=0), dict(temperature=1.3, top_k=20),
            dict(temperature=0.7, top_p=0.9), dict(temperature=1.0), dict(temperature=2.0, top_k=5, top_p=0.5)]
    for seed in range(5):
        gens = [torch.Generator().manual_seed(seed * 10 + b) for b in range(6)]
        got = sample_rows(logits, opts, gens)
        want = [int(sample(logits[b:b + 1], generator=torch.Generator().manual_seed(seed * 10 + b), **o)[0])
                for b, o in enumerate(opts)]
        assert got.tolist() == want
