"""`treeflash serve` on the tiny on-disk model, through the official `openai` client and raw HTTP (hermetic:
127.0.0.1 only). Every output is compared with the Python API on a second, independently loaded decoder."""

import contextlib
import http.client
import json
import socket
import threading
import time

import openai
import pytest

import treeflash
from treeflash.cli import main
from treeflash.decoding import DecodeConfig
from treeflash.serve.scheduler import Detokenizer, _safe_end
from treeflash.serve.app import Server, ServeConfig, uvicorn_server

from test_cli import model_dir  # noqa: F401  (the tiny Llama saved to disk with a word-level tokenizer)

MODEL = "tiny"
LONG = 400  # max_tokens that would keep the tiny model busy for seconds (its context holds 512)


@contextlib.contextmanager
def running(server: Server):
    """Serve `server` from a background thread on a free loopback port; yield (base URL, port)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    web = uvicorn_server(server, "127.0.0.1", port, log_level="warning")
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not web.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        web.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def reference(model_dir):  # noqa: F811
    """A decoder of its own, for the expected outputs (the server's is busy on other threads)."""
    return treeflash.load(str(model_dir), "untrained")


@pytest.fixture(scope="module")
def served(model_dir):  # noqa: F811
    """The server under test: up to four generations batched, room for 32 waiting requests."""
    config = ServeConfig(model_name=MODEL, max_batch=4, max_queue=32, max_tokens_limit=LONG)
    server = Server(treeflash.load(str(model_dir), "untrained"), config)
    with running(server) as (url, port):
        yield server, url, port


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="x", max_retries=0, timeout=30)


def post(port: int, path: str, body, method: str = "POST") -> tuple[int, dict]:
    """Raw HTTP, for bodies the openai client would never send."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, payload = response.status, response.read()
    conn.close()
    return status, json.loads(payload) if payload.startswith(b"{") else {"raw": payload.decode()}


def metric(port: int, name: str, **labels) -> float:
    """The sum of /metrics series `name` whose labels include `labels`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        series_name, _, rest = series.partition("{")
        pairs = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if p)
        if series_name == name and all(pairs.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def expected(reference, prompt: str, chat: bool = True, **fields):
    return reference.generate_text(prompt, DecodeConfig(**fields), chat=chat)


# -- outputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["treeflash", "ddtree", "ar"])
def test_chat_greedy_equals_the_python_api_streamed_or_not(client, reference, method):
    want = expected(reference, "w3 w9 w27", method=method, max_new_tokens=24)
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "w3 w9 w27"}], max_tokens=24, temperature=0,
                  extra_body={"method": method})
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].message.content == want.text
    assert reply.usage.prompt_tokens == len(want.prompt_ids) and reply.usage.completion_tokens == want.new_tokens
    assert reply.choices[0].finish_reason == ("length" if want.stop_reason == "max_new_tokens" else "stop")
    stats = reply.model_extra["treeflash"]
    assert stats["method"] == method and stats["rounds"] == want.rounds and stats["tau"] == pytest.approx(want.tau)

    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    last = chunks[-1]
    assert last.choices[0].finish_reason == reply.choices[0].finish_reason
    assert last.usage.completion_tokens == want.new_tokens and last.model_extra["treeflash"]["method"] == method


def test_a_request_may_set_its_ngram_lookup(client, reference):
    want = expected(reference, "w3 w9 w27", method="ddtree", max_new_tokens=24, lookup=6)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w3 w9 w27"}],
                                           max_tokens=24, temperature=0, extra_body={"method": "ddtree", "lookup": 6})
    assert reply.choices[0].message.content == want.text
    stats = reply.model_extra["treeflash"]
    assert stats["lookup"] == 6 and stats["rounds"] == want.rounds


def test_text_batch_api_equals_one_prompt_at_a_time(reference):
    prompts = ["w1 w2", "w3", "w4 w5 w6"]
    batched = reference.generate_text_batch(prompts, method="treeflash", max_new_tokens=12, stop_at_eos=False,
                                            max_batch=2)
    assert [r.text for r in batched] == [expected(reference, p, method="treeflash", max_new_tokens=12,
                                                  stop_at_eos=False).text for p in prompts]


def test_completion_takes_the_raw_prompt(client, reference):
    want = expected(reference, "w5 w6 w7", chat=False, max_new_tokens=20, stop_at_eos=False)
    kwargs = dict(model=MODEL, prompt="w5 w6 w7", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    reply = client.completions.create(**kwargs)
    assert reply.choices[0].text == want.text and reply.usage.prompt_tokens == 3
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20  # include_usage's extra chunk


def test_greedy_equals_treeflash_generate(client, model_dir, capsys):  # noqa: F811
    assert main(["generate", "w11 w12", "--target", str(model_dir), "--drafter", "untrained", "--method", "dflash",
                 "--max-new-tokens", "16", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w11 w12"}],
                                           max_tokens=16, temperature=0, extra_body={"method": "dflash"})
    assert reply.choices[0].message.content == cli["text"] and reply.usage.completion_tokens == cli["new_tokens"]


def test_every_message_goes_through_the_chat_template(client, reference):
    messages = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3"},
                {"role": "assistant", "content": "w4 w5"}, {"role": "user", "content": [{"type": "text", "text": "w6"}]}]
    plain = [{**m, "content": "w6"} if isinstance(m["content"], list) else m for m in messages]
    ids = reference.target.tokenizer.apply_chat_template(plain, add_generation_prompt=True, return_dict=False)
    want = reference.generate(ids, DecodeConfig(max_new_tokens=12))
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert reply.usage.prompt_tokens == len(ids) == 11 and reply.choices[0].message.content == want.text


def test_seeded_sampling_is_reproducible_and_reported(client, reference):
    want = expected(reference, "w8", method="treeflash", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w8"}], max_tokens=20,
                                           temperature=1.0, top_p=0.9, seed=7)
    assert reply.choices[0].message.content == want.text and reply.model_extra["treeflash"]["seed"] == 7
    drawn = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w8"}], max_tokens=5)
    assert isinstance(drawn.model_extra["treeflash"]["seed"], int)  # temperature 1 by default, as OpenAI


def test_stop_sequences_are_cut_and_end_the_generation(client, reference):
    full = expected(reference, "w2 w4", chat=False, max_new_tokens=40, temperature=1.0, seed=3, stop_at_eos=False)
    words = full.text.split()
    stop = " " + words[6]
    cut = full.text.find(stop)
    decode = reference.target.tokenizer.decode
    tokens_through_stop = next(k for k in range(1, 41) if stop in decode(full.token_ids[:k], skip_special_tokens=True))
    kwargs = dict(model=MODEL, prompt="w2 w4", max_tokens=40, temperature=1.0, seed=3,
                  extra_body={"ignore_eos": True})
    for stops in (stop, [" w96", stop]):
        reply = client.completions.create(**kwargs, stop=stops)
        assert reply.choices[0].text == full.text[:cut] and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == tokens_through_stop
        assert reply.model_extra["treeflash"]["stop_reason"] == "stop_sequence"
        chunks = list(client.completions.create(**kwargs, stop=stops, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == full.text[:cut]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_sixteen_concurrent_requests_each_equal_their_sequential_reference(served, reference):
    url = served[1]
    cases = [(i, "chat" if i % 2 else "text", i % 3 == 0, ["treeflash", "ddtree", "dflash", "ar"][i % 4])
             for i in range(16)]
    want = {i: expected(reference, f"w{10 + i} w{20 + i}", chat=kind == "chat", method=method, max_new_tokens=24,
                        temperature=1.0, seed=i, stop_at_eos=False).text
            for i, kind, _, method in cases}
    got, errors = {}, []

    def one(i, kind, stream, method):
        try:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            common = dict(model=MODEL, max_tokens=24, temperature=1.0, seed=i,
                          extra_body={"method": method, "ignore_eos": True}, stream=stream)
            prompt = f"w{10 + i} w{20 + i}"
            if kind == "chat":
                r = c.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
                got[i] = "".join(x.choices[0].delta.content or "" for x in r) if stream else r.choices[0].message.content
            else:
                r = c.completions.create(prompt=prompt, **common)
                got[i] = "".join(x.choices[0].text for x in r) if stream else r.choices[0].text
        except Exception as e:  # reported below, with the case that failed
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=one, args=case) for case in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert got == want


def test_concurrent_requests_share_batched_rounds(served):
    """Four long streams at once run in one batch: the engine holds all four, and the batch-size histogram
    records rounds of four generations."""
    server, url, port = served
    wait_for(lambda: server.engine.active == 0)
    before = metric(port, "treeflash_batch_size_bucket", le="2")
    before_all = metric(port, "treeflash_batch_size_count")
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    streams = [c.completions.create(model=MODEL, prompt=f"w{i}", max_tokens=LONG, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True, "method": m})
               for i, m in enumerate(["ar", "treeflash", "ddtree", "dflash"])]
    for stream in streams:
        next(iter(stream))
    wait_for(lambda: server.engine.active == 4)
    wait_for(lambda: metric(port, "treeflash_batch_size_count") - before_all >= 5)
    rounds = metric(port, "treeflash_batch_size_count") - before_all
    small = metric(port, "treeflash_batch_size_bucket", le="2") - before
    assert small < rounds  # some rounds ran more than two generations together
    for stream in streams:
        stream.close()
    wait_for(lambda: server.engine.active == 0)


def test_a_short_request_passes_a_long_one(served, client):
    server, _, port = served
    long = client.completions.create(model=MODEL, prompt="w1", max_tokens=LONG, temperature=0, stream=True,
                                     extra_body={"ignore_eos": True})
    next(iter(long))
    short = client.completions.create(model=MODEL, prompt="w2", max_tokens=4, temperature=0)
    assert short.usage.completion_tokens == 4 and server.engine.active >= 1  # the long one is still going
    long.close()
    wait_for(lambda: server.engine.active == 0)


# -- limits and errors ------------------------------------------------------------------------------


def _chat(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 4, **fields}


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
        ("/v1/chat/completions", b"\xff\xfe", 400, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
        ("/v1/chat/completions", b"[" * 100_000, 400, "not valid JSON"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}]}, 400, "provide a model"),
        ("/v1/chat/completions", _chat(model="gpt-4"), 404, "does not exist"),
        ("/v1/chat/completions", _chat(max_tokens=-5), 400, "max_tokens must be between 1 and"),
        ("/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens must be between 1 and"),
        ("/v1/chat/completions", _chat(max_tokens=10**12), 400, "max_tokens must be between 1 and"),
        ("/v1/chat/completions", _chat(max_completion_tokens=10**6), 400, "max_completion_tokens must be"),
        ("/v1/chat/completions", _chat(max_tokens="ten"), 400, "max_tokens must be a whole number"),
        ("/v1/chat/completions", _chat(max_tokens=2.5), 400, "max_tokens must be a whole number"),
        ("/v1/chat/completions", _chat(temperature=-1), 400, "temperature must be between 0 and 2"),
        ("/v1/chat/completions", _chat(temperature=9), 400, "temperature must be between 0 and 2"),
        ("/v1/chat/completions", _chat(temperature="hot"), 400, "temperature must be a number"),
        ("/v1/chat/completions", _chat(top_p=0), 400, "top_p"),
        ("/v1/chat/completions", _chat(seed="x"), 400, "seed must be a whole number"),
        ("/v1/chat/completions", _chat(stream="yes"), 400, "stream must be true or false"),
        ("/v1/chat/completions", _chat(n=2), 400, "n must be 1"),
        ("/v1/chat/completions", _chat(stop=7), 400, "stop must be"),
        ("/v1/chat/completions", _chat(stop=["a", "b", "c", "d", "e"]), 400, "stop must be"),
        ("/v1/chat/completions", _chat(messages="w1"), 400, "messages must be a non-empty array"),
        ("/v1/chat/completions", _chat(messages=[]), 400, "messages must be a non-empty array"),
        ("/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "w1"}]), 400, "role must be"),
        ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": 3}]), 400, "content must be"),
        ("/v1/chat/completions", _chat(method="beam"), 400, "method must be one of"),
        ("/v1/chat/completions", _chat(budget=0), 400, "budget must be between 1 and"),
        ("/v1/chat/completions", _chat(budget=10**6), 400, "budget must be between 1 and"),
        ("/v1/chat/completions", _chat(lookup=-1), 400, "lookup must be between 0 and"),
        ("/v1/chat/completions", _chat(lookup=10**6), 400, "lookup must be between 0 and"),
        ("/v1/chat/completions", _chat(lookup="many"), 400, "lookup must be a whole number"),
        ("/v1/chat/completions", _chat(logprobs=True), 400, "logprobs is not supported"),
        ("/v1/chat/completions", _chat(tools=[{"type": "function"}]), 400, "tools is not supported"),
        ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "w1 " * 600}]), 400, "context holds 512"),
        ("/v1/completions", {"model": MODEL, "prompt": "w1 " * 450, "max_tokens": 100}, 400, "lower max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": ["w1", "w2"]}, 400, "one prompt per request"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 500]}, 400, "token ids in [0, 97)"),
        ("/v1/completions", {"model": MODEL, "prompt": "   "}, 400, "prompt is empty"),
        ("/v1/completions", {"model": MODEL, "prompt": None}, 400, "prompt must be a string"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "' + b"w1 " * (2 << 20) + b'"}', 413, "larger than"),
        ("/v1/nothing", {}, 404, "there is no endpoint"),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_the_server_goes_on(served, path, body, status, message):
    port = served[2]
    got, payload = post(port, path, body)
    assert got == status, payload
    error = payload["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    ok, reply = post(port, "/v1/completions", {"model": MODEL, "prompt": "w1", "max_tokens": 2})
    assert ok == 200 and reply["usage"]["completion_tokens"] == 2


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "w1"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="w1", max_tokens=10**9)
    assert e.value.param == "max_tokens"


def test_a_full_queue_gets_503(model_dir):  # noqa: F811
    """One at a time (max_batch 1) with room for one waiting request: the third request is refused."""
    server = Server(treeflash.load(str(model_dir), "untrained"),
                    ServeConfig(model_name=MODEL, max_batch=1, max_queue=1, max_tokens_limit=LONG))
    with running(server) as (url, port):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        long = dict(model=MODEL, prompt="w1", max_tokens=LONG, temperature=0, stream=True,
                    extra_body={"ignore_eos": True})
        running_one = c.completions.create(**long)
        next(iter(running_one))
        waiting_one = c.completions.create(**long)
        wait_for(lambda: server.engine.waiting == 1)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=MODEL, prompt="w1", max_tokens=2)
        assert e.value.status_code == 503 and "busy" in e.value.message
        running_one.close()
        waiting_one.close()
        wait_for(lambda: server.engine.waiting == 0 and server.engine.active == 0)
        assert metric(port, "treeflash_generations_total", outcome="cancelled") == 2
        assert c.completions.create(model=MODEL, prompt="w1", max_tokens=2).usage.completion_tokens == 2


def test_a_client_that_disconnects_stops_its_generation(served, client):
    server, _, port = served
    wait_for(lambda: server.engine.active == 0)
    before_tokens = metric(port, "treeflash_generated_tokens_total")
    before_cancelled = metric(port, "treeflash_generations_total", outcome="cancelled")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w7"}],
                                            max_tokens=LONG, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks), next(chunks)  # the role, then the first text
    stream.close()
    wait_for(lambda: metric(port, "treeflash_generations_total", outcome="cancelled") == before_cancelled + 1)

    # A non-streaming client that hangs up: the handler notices while it waits.
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"model": MODEL, "prompt": "w9", "max_tokens": LONG, "temperature": 0, "ignore_eos": True})
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    wait_for(lambda: server.engine.active == 1)
    sock.close()
    wait_for(lambda: metric(port, "treeflash_generations_total", outcome="cancelled") == before_cancelled + 2)
    wait_for(lambda: server.engine.active == 0)
    assert metric(port, "treeflash_generated_tokens_total") - before_tokens < LONG  # both stopped well short


def test_models_health_and_metrics(served, client):
    _, _, port = served
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    status, health = post(port, "/health", b"", method="GET")
    assert status == 200 and health["status"] == "ok"
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w3"}], max_tokens=3)
    assert metric(port, "treeflash_requests_total", endpoint="/v1/chat/completions", status="200") >= 1
    assert metric(port, "treeflash_tau_count", method="treeflash") >= 1
    assert metric(port, "treeflash_request_duration_seconds_count", endpoint="/v1/chat/completions") >= 1
    for name in ("treeflash_queue_length", "treeflash_active_generations", "treeflash_generated_tokens_total",
                 "treeflash_time_to_first_token_seconds", "treeflash_batch_size"):
        assert f"# TYPE {name} " in post(port, "/metrics", b"", method="GET")[1]["raw"]


# -- text: deltas and stop sequences, on a character-level "tokenizer" -------------------------------


def _chars(ids):
    return "".join(chr(i) for i in ids)


def test_text_is_held_back_while_it_may_start_a_stop_sequence():
    text = Detokenizer(_chars, ("xyz",))
    assert text.add([ord("a"), ord("x")]) == "a"  # "x" may start "xyz"
    assert text.add([ord("y"), ord("b")]) == "xyb"  # it did not
    assert text.add([ord("x"), ord("y"), ord("z"), ord("c")]) == "" and text.stopped
    assert text.text == "axyb" and text.completion_tokens == 7  # up to the token that completed the stop
    assert _safe_end("ab\ufffd", ()) == 2 and _safe_end("abxy", ("xyz", "bx!")) == 2


# -- regeneration through a server -----------------------------------------------------------------


def test_regeneration_through_treeflash_serve_equals_in_process_at_t0(served, model_dir, tmp_path):  # noqa: F811
    """`treeflash train data --server URL` against `treeflash serve` on loopback writes the records that
    in-process regeneration writes: prompts sent as token ids, responses returned as token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from treeflash.train.prompts import Prompt
    from treeflash.train.records import load_sequences
    from treeflash.train.regenerate import regenerate, regenerate_via_server

    url = served[1]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    prompts = [Prompt(f"p{i}", f"w{3 + i} w{40 + i} w{7 * i % 90}") for i in range(7)]
    local = regenerate(model, tokenizer, prompts, tmp_path / "local", max_new_tokens=20, batch_size=3,
                       progress=False)
    remote = regenerate_via_server(url, tokenizer, prompts, tmp_path / "remote", eos_token_id=1, max_new_tokens=20,
                                   batch_size=3, concurrency=3, progress=False)
    assert remote["retokenized"] == 0 and remote["shards"] == local["shards"] == 3
    for name in ("shard-00000.jsonl.gz", "shard-00001.jsonl.gz", "shard-00002.jsonl.gz"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert len(load_sequences(tmp_path / "remote")) == 7
    again = regenerate_via_server(url, tokenizer, prompts, tmp_path / "remote", eos_token_id=1, max_new_tokens=20,
                                  batch_size=3, progress=False)
    assert again["written_now"] == 0  # resumed: every shard was already there


def test_the_completion_client_retries_and_retokenises_text_only_replies(model_dir):  # noqa: F811
    """A server that answers 503 once and then returns text without token ids (as SGLang does): the client
    retries, re-tokenises the text, appends EOS at a "stop" and checks the round trip."""
    import http.server

    from transformers import AutoTokenizer

    from treeflash.train.client import CompletionClient

    calls = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def _reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply(200, {"data": [{"id": "flaky"}]})

        def do_POST(self):
            calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            if len(calls) == 1:
                return self._reply(503, {"error": {"message": "busy"}})
            self._reply(200, {"choices": [{"text": "w5 w6", "finish_reason": "stop"}]})

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        client = CompletionClient(f"http://127.0.0.1:{httpd.server_address[1]}")
        assert client.model == "flaky"
        done = client.complete([2, 10, 3], 8, 0.0, None, tokenizer=tokenizer, eos_token_id=1)
    finally:
        httpd.shutdown()
    assert len(calls) == 2 and calls[1]["prompt"] == [2, 10, 3] and calls[1]["return_token_ids"] is True
    assert done.token_ids == [10, 11, 1] and not done.from_server and done.round_trip


def test_a_server_without_a_drafter_serves_ar_by_default(model_dir):  # noqa: F811
    server = Server(treeflash.load(str(model_dir), "none"), ServeConfig(model_name=MODEL))
    assert server.config.method == "ar"
    headless = Server(treeflash.load(str(model_dir), "untrained"), ServeConfig(model_name=MODEL, method="ddtree"))
    assert headless.config.method == "ddtree"
    server.engine.close()
    headless.engine.close()
