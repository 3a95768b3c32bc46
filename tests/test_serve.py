"""`dflash serve` end to end: the server in a subprocess on SmolLM2, talked to with the official openai client."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import openai
import pytest
from typer.testing import CliRunner

from dflash_local.cli import app
from dflash_local.engine import Engine
from dflash_local.target import Target, TargetParams

KEY = "sk-test"
PROMPT = "Write a haiku about the sea."
N = 24  # tokens per answer: short, the file runs on a 2-core CPU


class Response:
    def __init__(self, r: http.client.HTTPResponse):
        self.status_code, self.headers, self.text = r.status, r.headers, r.read().decode()

    def json(self) -> dict:
        return json.loads(self.text)


class Server:
    def __init__(self, args: list[str], log: Path, api_key: str | None):
        with socket.socket() as s:  # a free port
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.proc = subprocess.Popen([sys.executable, "-m", "dflash_local", "serve", *args, "--port", str(self.port),
                                      "--threads", "1"], stdout=subprocess.DEVNULL, stderr=log.open("w"),
                                     cwd=log.parent)  # the installed package, not the source tree

    def wait_started(self) -> None:
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if self.request("GET", "/health").status_code == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

    def client(self, **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, **kw)

    def open(self, method: str, route: str, body: object = None, headers: dict[str, str] | None = None,
             host: str = "127.0.0.1") -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """A raw request (stdlib: bad bodies, missing keys, a connection closed mid-stream)."""
        conn = http.client.HTTPConnection(host, self.port, timeout=60)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, route, data, {**self.headers, **(headers or {}), "Content-Type": "application/json"})
        return conn, conn.getresponse()

    def request(self, method: str, route: str, body: object = None, **kw: object) -> Response:
        conn, r = self.open(method, route, body, **kw)
        with closing(conn):
            return Response(r)

    def post(self, route: str, body: object, **kw: object) -> Response:
        return self.request("POST", route, body, **kw)

    def health(self) -> dict:
        return self.request("GET", "/health").json()

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (h := self.health())["busy"] or h["queued"]:
            assert time.monotonic() < deadline, h
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown (models closed, exit code 0)."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, self.log.read_text()
        log = self.log.read_text()
        assert "stopped" in log and "Traceback" not in log and "ERROR" not in log, log


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(*args: str, api_key: str | None = KEY) -> Server:
        log = tmp_path_factory.mktemp("serve") / "stderr.txt"
        servers.append(Server([*args, *(["--api-key", api_key] if api_key else [])], log, api_key))
        servers[-1].wait_started()
        return servers[-1]

    yield make
    for server in servers:
        if server.proc.poll() is None:
            server.stop()


@pytest.fixture(scope="module")
def smol(start) -> Server:
    """SmolLM2 with its shipped drafter, as `dflash run smollm2` uses it."""
    return start("smollm2")


def dflash_run(*args: str) -> str:
    result = CliRunner().invoke(app, ["run", "smollm2", "--temp", "0", "--threads", "1", "-n", str(N), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def chat(client: openai.OpenAI, prompt: str, stream: bool, **kw: object) -> tuple[str, str]:
    """The answer's text and finish reason."""
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        r = client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    chunks = list(client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0,
                                                 stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def complete(client: openai.OpenAI, prompt: str, stream: bool, **kw: object) -> tuple[str, str]:
    if not stream:
        r = client.completions.create(model="any", prompt=prompt, max_tokens=N, temperature=0, **kw)
        return r.choices[0].text, r.choices[0].finish_reason
    chunks = list(client.completions.create(model="any", prompt=prompt, max_tokens=N, temperature=0, stream=True,
                                            **kw))
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


def test_same_text_as_dflash_run(smol):
    client = smol.client()
    expected_chat, expected_raw = dflash_run("-p", PROMPT), dflash_run("--no-chat-template", "-p", PROMPT)
    for stream in (False, True):
        assert chat(client, PROMPT, stream)[0] + "\n" == expected_chat
        assert complete(client, PROMPT, stream)[0] + "\n" == expected_raw
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": PROMPT}], max_tokens=N,
                                       temperature=0)
    assert r.usage.completion_tokens <= N and r.usage.prompt_tokens > 0
    assert {"predicted_per_second", "tau", "draft_share"} <= set(r.model_extra["timings"])
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_stop_strings_cut_the_text(smol):
    client = smol.client()
    full, _ = complete(client, PROMPT, False)
    stop = full.split()[len(full.split()) // 2]  # a word in the middle
    for stream in (False, True):
        text, finish = complete(client, PROMPT, stream, stop=["never there", stop])
        assert (text, finish) == (full[:full.index(stop)], "stop")


def test_concurrent_clients_get_their_own_answers(smol):
    prompts = [PROMPT, "What is the capital of France?", "Name three colors.", "Count from one to five.",
               "Say hello in Spanish."]
    client = smol.client(timeout=120)
    expected = {p: chat(client, p, False)[0] for p in prompts}
    jobs = [(prompts[i % len(prompts)], i % 2 == 0) for i in range(20)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: chat(client, *job)[0], jobs))
    assert answers == [expected[p] for p, _ in jobs]


def test_a_client_gone_mid_stream_stops_its_generation(smol):
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 2000, "stream": True}
    conn, r = smol.open("POST", "/v1/completions", body)
    with closing(conn):  # closed after the first event
        assert r.status == 200 and r.readline().startswith(b"data: ")
    # 2000 tokens would take the server half a minute: it stops at the next step instead
    smol.wait_idle(timeout=5)
    conn = http.client.HTTPConnection("127.0.0.1", smol.port)  # the same, answered whole
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": False}), smol.headers)
    while not smol.health()["busy"]:
        time.sleep(0.02)
    conn.close()
    smol.wait_idle(timeout=5)
    expected = dflash_run("--no-chat-template", "-p", PROMPT)
    assert complete(smol.client(), PROMPT, True)[0] + "\n" == expected


def test_errors(smol, start, tmp_path):
    def error(response: Response, status: int, message: str) -> None:
        assert response.status_code == status, response.text
        assert message in response.json()["error"]["message"]

    error(smol.post("/v1/chat/completions", b"{not json"), 400, "not valid JSON")
    error(smol.post("/v1/chat/completions", {"messages": "hi"}), 400, "'messages'")
    error(smol.post("/v1/completions", {"prompt": "hi", "max_tokens": 0}), 400, "'max_tokens'")
    error(smol.post("/v1/completions", {"prompt": "hi", "temperature": "hot"}), 400, "'temperature'")
    error(smol.post("/v1/completions", {"prompt": "hi", "stop": [1]}), 400, "'stop'")
    error(smol.post("/v1/completions", {"prompt": "word " * 5000, "stream": True}), 400, "but the context holds")
    error(smol.post("/v1/completions", {"prompt": "hi"}, headers={"Authorization": "Bearer wrong"}), 401, "API key")
    error(smol.post("/v1/completions", {"prompt": "hi"}, headers={"Authorization": ""}), 401, "API key")
    error(smol.request("GET", "/v1/nothing"), 404, "Not Found")
    with pytest.raises(openai.BadRequestError):
        smol.client().chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                              top_p=2.0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{smol.url}/v1", api_key="wrong", max_retries=0).models.list()

    # a full queue: one request generating, one waiting (the queue holds one), the next is answered 503
    busy = start("smollm2", "--no-draft", "--queue-size", "1", api_key=None)
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 2000, "stream": True}
    conn, r = busy.open("POST", "/v1/completions", body)
    with closing(conn):
        r.readline()
        waiting = threading.Thread(target=busy.post, args=("/v1/completions", {"prompt": "hi", "max_tokens": 4}))
        waiting.start()
        while busy.health()["queued"] < 1:
            time.sleep(0.02)
        full = busy.post("/v1/completions", {"prompt": "hi"})
        error(full, 503, "busy")
        assert full.headers["Retry-After"].isdigit()
    waiting.join(30)
    assert not waiting.is_alive()


def test_listens_on_localhost_only_by_default(smol):
    addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None) if a[0] == socket.AF_INET}
    others = addresses - {"127.0.0.1"}
    for address in others:
        with pytest.raises(OSError):
            smol.request("GET", "/health", host=address)


def test_the_engine_stops_when_on_tokens_returns_false(tiny_target):
    tg = Target(tiny_target("llama"), TargetParams(n_ctx=128, n_threads=1))
    try:
        engine, prompt = Engine(tg), [1, 5, 6, 7, 8]
        full = engine.generate(prompt, 12).tokens
        seen: list[int] = []
        gen = engine.generate(prompt, 12, on_tokens=lambda tokens: seen.extend(tokens) or len(seen) < 5)
        assert gen.stop == "cancelled" and gen.tokens == seen == full[:5]
    finally:
        tg.close()


def test_sigterm_ends_open_streams_and_stops_cleanly(start):
    server = start("smollm2", "--no-draft", api_key=None)
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 2000, "stream": True}
    conn, r = server.open("POST", "/v1/completions", body)
    with closing(conn):
        assert r.readline().startswith(b"data: ")
        t0 = time.monotonic()
        server.stop()  # exit code 0, "stopped": the models closed
        assert time.monotonic() - t0 < 10
        rest = r.read().decode()
    assert '"finish_reason": "length"' in rest and rest.endswith("data: [DONE]\n\n")
