"""The OpenAI-compatible server: the real `openai` client against a tiny model served by uvicorn
on 127.0.0.1 in this process. Greedy answers equal offline `generate_tokens` on the same rendered
prompt, token for token, streamed or not, alone or among 16 concurrent streams; a client that
goes away frees its batch slot; every refusal has its status and OpenAI's error body; shutdown
finishes the running streams."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import TINY32, init_params  # noqa: E402
from test_conversations import stdlib_texts  # noqa: E402

from dsv3_jax.chat.template import EOS, render_chat  # noqa: E402
from dsv3_jax.data.conversations import check_chat_tokenizer  # noqa: E402
from dsv3_jax.data.tokenizer import train_tokenizer  # noqa: E402
from dsv3_jax.infer.generate import generate_tokens  # noqa: E402
from dsv3_jax.infer.sampling import Sampling  # noqa: E402
from dsv3_jax.serve.app import create_app, _Text  # noqa: E402
from dsv3_jax.serve.engine import Engine, Request  # noqa: E402

CFG = TINY32.replace(max_seq_len=128)
MODEL = "tiny-test"
# No persistent-cache writes from this module (reads stay): one fresh-clone CI run aborted inside
# XLA's executable.serialize() for a cache write here, with the engine and uvicorn threads idle;
# it did not come back in a rerun on a fresh cache. The server subprocesses get the same setting.
NO_CACHE_WRITES = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1000000000"}


@pytest.fixture(autouse=True, scope="module")
def _no_cache_writes():
    import jax

    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_tok")
    return train_tokenizer(stdlib_texts("json", "email"), str(folder / "tokenizer.model"),
                           vocab_size=512, num_threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """An engine + app under uvicorn on a thread; `client` is an openai.OpenAI for it."""

    def __init__(self, params, tokenizer, cfg=CFG, **engine_args):
        markers = check_chat_tokenizer(tokenizer)
        self.stop_tokens = sorted({tokenizer.eos_id, markers[EOS]})
        self.engine = Engine(cfg, params, vocab_limit=tokenizer.vocab_size,
                             **{"max_batch": 4, "prefill_chunk": 32, **engine_args}).start()
        app = create_app(self.engine, tokenizer, model_name=MODEL, stop_tokens=self.stop_tokens)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                                    timeout=300)

    def close(self):
        self.engine.shutdown(timeout=60)
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(params, tokenizer):
    s = Served(params, tokenizer)
    yield s
    s.close()


def _offline(params, tokenizer, stop_tokens, ids, max_new, cfg=CFG):
    """Greedy generate_tokens on the same ids, limited to the tokenizer's pieces, as the server
    samples; the answer's text without the stop token (the server's `content`)."""
    out = generate_tokens(cfg, params, [ids], max_new_tokens=max_new,
                          sampling=Sampling(vocab_limit=tokenizer.vocab_size),
                          stop_tokens=stop_tokens).tokens[0][len(ids):]
    finish = "stop" if out and out[-1] in stop_tokens else "length"
    kept = [t for t in out if t not in stop_tokens]
    return out, tokenizer.decode(kept, keep_special=True), finish


def _messages(i: int):
    words = ["hello", "the json format", "an email address", "what is a header", "tell me more"]
    return [{"role": "user", "content": " ".join(words[: 1 + i % len(words)]) + f" {i}"}]


def test_chat_streamed_and_not_equal_offline_greedy(served, params, tokenizer):
    messages = _messages(3)
    ids = tokenizer.encode(render_chat(messages))
    out, text, finish = _offline(params, tokenizer, served.stop_tokens, ids, 12)
    got = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                temperature=0)
    assert got.choices[0].message.content == text
    assert got.choices[0].finish_reason == finish
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(out)
    assert got.usage.total_tokens == len(ids) + len(out)
    pieces, finishes, usage = [], [], None
    for chunk in served.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finishes.append(choice.finish_reason)
    assert "".join(pieces) == text and finishes[-1] == finish
    assert usage.completion_tokens == len(out)


def test_sixteen_concurrent_streams_each_equal_offline(served, params, tokenizer):
    """16 streams of different prompt and answer lengths on 4 batch slots: requests join and
    leave the batch while others run, and every answer is its offline greedy answer."""
    jobs = [(_messages(i), 3 + (5 * i) % 17) for i in range(16)]
    offline = [_offline(params, tokenizer, served.stop_tokens, tokenizer.encode(render_chat(m)), n)
               for m, n in jobs]
    expected = [text for _, text, _ in offline]

    def stream(job):
        messages, n = job
        text = []
        for chunk in served.client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=n, temperature=0, stream=True):
            text += [c.delta.content or "" for c in chunk.choices]
        return "".join(text)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(stream, jobs))
    assert got == expected
    metrics = httpx.get(served.url + "/metrics").text
    counts = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert counts["dsv3_generation_tokens_total"] >= sum(len(out) for out, _, _ in offline)
    assert counts["dsv3_time_to_first_token_seconds_count"] >= 16


def test_completions_and_models_and_health(served, params, tokenizer):
    prompt = "The json format"
    ids = tokenizer.encode(prompt)
    _, text, _ = _offline(params, tokenizer, served.stop_tokens, ids, 8)
    got = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                           temperature=0)
    assert got.choices[0].text == text
    assert [m.id for m in served.client.models.list().data] == [MODEL]
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_stop_strings_cut_the_answer(served, params, tokenizer):
    messages = _messages(1)
    full = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                                 temperature=0).choices[0].message.content
    if len(full) < 4:
        pytest.skip("this random model's answer is too short to cut")
    stop = full[2:4]
    got = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                                temperature=0, stop=[stop])
    assert got.choices[0].message.content == full[:full.find(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_a_seeded_sampled_answer_repeats(served):
    ask = lambda seed: served.client.chat.completions.create(
        model=MODEL, messages=_messages(2), max_tokens=10, temperature=1.0, top_p=0.9,
        seed=seed).choices[0].message.content
    assert ask(7) == ask(7)
    assert ask(-3) == ask(-3)  # the API's seeds are any int64


@pytest.mark.parametrize("body, status, fragment", [
    ({"temperature": 3}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"n": 2}, 400, "n=2"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "gpt-9"}, 404, "gpt-9"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({"max_tokens": 500}, 400, "maximum context length is 128 tokens"),
])
def test_refusals_have_their_status_and_an_openai_error_body(served, body, status, fragment):
    request = {"model": MODEL, "messages": _messages(0), "max_tokens": 4, **body}
    r = httpx.post(served.url + "/v1/chat/completions", json=request, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_text_content_parts_and_unknown_routes(served):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "},
                                          {"type": "text", "text": "0"}]}]
    plain = [{"role": "user", "content": "hello 0"}]
    ask = lambda m: served.client.chat.completions.create(
        model=MODEL, messages=m, max_tokens=4, temperature=0).choices[0].message.content
    assert ask(parts) == ask(plain)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    r = httpx.post(served.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": image}, timeout=60)
    assert r.status_code == 400 and "text content parts" in r.json()["error"]["message"]
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions",
                                                                 405)):
        r = httpx.request(method, served.url + path, timeout=60)
        assert r.status_code == status and "not a route" in r.json()["error"]["message"]


def test_the_openai_client_sees_the_context_error(served):
    with pytest.raises(openai.BadRequestError, match="128 tokens"):
        served.client.chat.completions.create(model=MODEL, messages=_messages(0), max_tokens=999)


def test_a_disconnect_frees_the_slot_and_a_full_queue_is_429(params, tokenizer):
    # A context of 2,048 positions (the same parameters: RoPE has no table): the first stream
    # asks for 2,000 tokens, so it still holds the slot when the second request comes, on any
    # machine, until its client goes away.
    s = Served(params, tokenizer, cfg=CFG.replace(max_seq_len=2048), max_batch=1, queue_size=0)
    try:
        request = {"model": MODEL, "messages": _messages(0), "max_tokens": 2000, "stream": True,
                   "temperature": 0}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=request,
                          timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the stream runs and holds the only slot
            busy = httpx.post(s.url + "/v1/chat/completions",
                              json={**request, "stream": False, "max_tokens": 2}, timeout=60)
            assert busy.status_code == 429 and "retry later" in busy.json()["error"]["message"]
        # The client went away: its slot frees and the next request is served.
        deadline = time.monotonic() + 60
        while s.engine.running and time.monotonic() < deadline:
            time.sleep(0.05)
        got = s.client.chat.completions.create(model=MODEL, messages=_messages(1), max_tokens=3,
                                               temperature=0)
        assert got.usage.completion_tokens >= 1
        assert s.engine.metrics.value("requests_total", status="cancelled") >= 1
    finally:
        s.close()


def test_shutdown_finishes_running_streams_then_refuses(params, tokenizer):
    long = CFG.replace(max_seq_len=1024)  # a stream long enough to be running at shutdown
    s = Served(params, tokenizer, cfg=long, max_batch=2)
    try:
        messages = _messages(4)
        ids = tokenizer.encode(render_chat(messages))
        _, text, _ = _offline(params, tokenizer, s.stop_tokens, ids, 400, cfg=long)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(lambda: s.client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=400, temperature=0))
            deadline = time.monotonic() + 60
            while not s.engine.running and time.monotonic() < deadline:
                time.sleep(0.01)
            s.engine.shutdown(wait=False)
            refused = httpx.post(s.url + "/v1/chat/completions",
                                 json={"model": MODEL, "messages": messages, "max_tokens": 2},
                                 timeout=60)
            assert refused.status_code == 503
            assert httpx.get(s.url + "/health").status_code == 503
            assert running.result(timeout=120).choices[0].message.content == text
    finally:
        s.close()


def test_text_holds_back_what_could_become_a_stop_string(tokenizer):
    ids = tokenizer.encode("hello world, hello there")
    text = _Text(tokenizer, ["o t"], (), reasoning=False, inside_think=False)
    sent = "".join(text.advance([t])[1] for t in ids) + text.advance([], final=True)[1]
    full = tokenizer.decode(ids, keep_special=True)
    assert sent == full[:full.find("o t")] and text.stopped


def test_reasoning_goes_to_reasoning_content(tokenizer):
    from dsv3_jax.chat.template import THINK_BEGIN, THINK_END

    ids = tokenizer.encode(f"{THINK_BEGIN}let me see{THINK_END}the answer")
    text = _Text(tokenizer, [], (), reasoning=True, inside_think=False)
    parts = [text.advance([t]) for t in ids] + [text.advance([], final=True)]
    assert "".join(p[0] for p in parts).strip() == "let me see"
    assert "".join(p[1] for p in parts).strip() == "the answer"


def test_engine_refuses_what_cannot_fit(params):
    engine = Engine(CFG, params, max_batch=1)
    with pytest.raises(Exception, match="maximum context length is 128"):
        engine.submit(Request(prompt=[5] * 100, max_new_tokens=40, on_event=print))
    with pytest.raises(Exception, match="outside the vocabulary"):
        engine.submit(Request(prompt=[CFG.vocab_size], max_new_tokens=1, on_event=print))
    with pytest.raises(ValueError, match="max_batch"):
        Engine(CFG, params, max_batch=0)


# ---- python -m dsv3_jax.serve ------------------------------------------------------------------

def _serve_cmd(*args):
    import os
    import subprocess
    import sys

    from conftest import COMPILATION_CACHE

    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE), JAX_PLATFORMS="cpu",
               **NO_CACHE_WRITES)
    return subprocess.Popen([sys.executable, "-m", "dsv3_jax.serve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("args, fragment, status", [
    (["--checkpoint=/nonexistent/run"], "/nonexistent/run", 1),
    (["--checkpoint=x", "--port=0"], "--port=0", 2),
    (["--checkpoint=x", "--max_batch=0"], "--max_batch=0", 2),
    (["--checkpoint=x", "stray"], "unexpected arguments", 2),
])
def test_cli_refusals(args, fragment, status):
    proc = _serve_cmd(*args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    assert fragment in err and "Traceback" not in err


def test_cli_refuses_a_busy_port_before_loading():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _serve_cmd("--checkpoint=/not/loaded", f"--port={port}")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in err, err[-2000:]
    assert "Traceback" not in err and "/not/loaded" not in err  # refused before loading


def test_cli_serves_a_checkpoint_and_stops_on_sigterm(tmp_path, tokenizer):
    import signal

    from conftest import random_checkpoint

    folder = random_checkpoint(tmp_path / "ckpt", CFG, tokenizer)
    port = _free_port()
    proc = _serve_cmd(f"--checkpoint={folder}", f"--port={port}", "--max_seq_len=64",
                      "--max_batch=2")
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["ckpt"]
        got = client.chat.completions.create(model="ckpt", messages=_messages(0), max_tokens=4,
                                             temperature=0)
        assert got.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert '"path": "/v1/chat/completions"' in err  # the access log line
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bench_serve_smoke(tmp_path, tokenizer):
    """experiments/bench_serve.py --smoke: launches a server on a checkpoint without and with
    MTP speculation, 1 and 2 streaming clients each, a table with every request served."""
    import subprocess
    import sys

    from conftest import COMPILATION_CACHE, random_checkpoint

    folder = random_checkpoint(tmp_path / "ckpt", CFG, tokenizer)
    env = dict(__import__("os").environ, JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE),
               JAX_PLATFORMS="cpu", **NO_CACHE_WRITES)
    out = subprocess.run([sys.executable, "experiments/bench_serve.py", f"--launch={folder}",
                          "--smoke", "--max_seq_len=64", f"--log_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines()
            if line.startswith(("| off |", "| on |"))]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("off", "1", "4", "0"), ("off", "2", "4", "0"), ("on", "1", "4", "0"),
        ("on", "2", "4", "0")]
    assert rows[0][-1] == "0" and float(rows[2][-1]) >= 0  # acceptance: none without drafts
    bad = subprocess.run([sys.executable, "experiments/bench_serve.py",
                          "--url=http://example.com:8000"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "127.0.0.1" in bad.stderr


def test_the_paged_cache_is_shared_and_streams_wait_for_pages(params):
    """A pool of 64 positions (4 pages of 16) for 4 batch slots of 128 positions: streams of up
    to 32 positions run two at a time, a larger one waits for pages, all equal offline greedy;
    one that needs more than the whole pool is refused."""
    import queue

    engine = Engine(CFG, params, max_batch=4, page_size=16, cache_tokens=64,
                    prefill_chunk=16).start()
    try:
        assert engine.pool.shape[:3] == (CFG.n_layers, 5, 16)  # 4 pages + the unread page 0
        rng = np.random.default_rng(1)
        jobs = [(rng.integers(3, CFG.vocab_size, int(n)).tolist(), int(m))
                for n, m in [(10, 6), (20, 12), (5, 27), (17, 15), (30, 18), (8, 8)]]
        events, peak = queue.Queue(), [0.0]
        for i, (prompt, m) in enumerate(jobs):
            engine.submit(Request(prompt=prompt, max_new_tokens=m,
                                  on_event=lambda kind, v, i=i: events.put((i, kind, v))))
        got, done = {i: [] for i in range(len(jobs))}, set()
        while len(done) < len(jobs):
            i, kind, value = events.get(timeout=300)
            peak[0] = max(peak[0], engine.metrics.value("cache_occupancy"))
            if kind == "tokens":
                got[i] += value
            else:
                assert (kind, value) == ("done", "length")
                done.add(i)
        for i, (prompt, m) in enumerate(jobs):
            assert got[i] == generate_tokens(CFG, params, [prompt],
                                             max_new_tokens=m).tokens[0][len(prompt):]
        assert 0 < peak[0] <= 1 and engine.free_pages and len(engine.free_pages) == 4
        with pytest.raises(Exception, match="whole cache holds 64"):
            engine.submit(Request(prompt=[5] * 40, max_new_tokens=40, on_event=print))
    finally:
        engine.shutdown(timeout=60)


def test_streamed_text_completion_equals_offline(served, params, tokenizer):
    prompt = "an email address has"
    _, text, finish = _offline(params, tokenizer, served.stop_tokens, tokenizer.encode(prompt), 9)
    pieces = [c.choices[0].text for c in served.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=9, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == text


# ---- MTP speculation -----------------------------------------------------------------------------
# The engine tests below run in a pytest of their own (test_speculative_engine_in_a_fresh_process):
# in two fresh-clone `make test` runs the xdist worker died inside XLA during the first of them
# (SIGABRT in executable.serialize(), then SIGSEGV compiling _mtp_prefill_row on the engine
# thread), after the worker had run many other tests; in a fresh process they always passed.
# Not understood yet: see the closing note of 2026-12-04.
IN_FRESH_PROCESS = "DSV3_SERVE_FRESH_PROCESS"
fresh_process = pytest.mark.skipif(
    not __import__("os").environ.get(IN_FRESH_PROCESS),
    reason="runs in its own process, through test_speculative_engine_in_a_fresh_process")


def test_speculative_engine_in_a_fresh_process():
    import os
    import subprocess
    import sys

    from conftest import COMPILATION_CACHE

    env = dict(os.environ, **{IN_FRESH_PROCESS: "1"}, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE), **NO_CACHE_WRITES)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "no:xdist", __file__, "-k", "speculative and not fresh_process"],
                         capture_output=True, text=True, timeout=900, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " skipped" not in out.stdout, out.stdout[-2000:]

def _run_engine(engine, jobs, **request_args):
    import queue

    events = queue.Queue()
    for i, (prompt, m) in enumerate(jobs):
        engine.submit(Request(prompt=prompt, max_new_tokens=m, **request_args,
                              on_event=lambda kind, v, i=i: events.put((i, kind, v))))
    got, ends = {i: [] for i in range(len(jobs))}, {}
    while len(ends) < len(jobs):
        i, kind, value = events.get(timeout=300)
        if kind == "tokens":
            got[i] += value
        else:
            ends[i] = (kind, value)
    return [got[i] for i in range(len(jobs))], ends


def _jobs(seed, n=6):
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, CFG.vocab_size, int(p)).tolist(), int(m))
            for p, m in zip(rng.integers(2, 40, n), rng.integers(1, 20, n))]


@fresh_process
def test_speculative_greedy_equals_plain_greedy(params):
    """Every row's draft is verified by the main model: greedy speculative answers are the plain
    greedy ones (this random model's drafts are mostly rejected: the correction path)."""
    engine = Engine(CFG, params, max_batch=3, prefill_chunk=16, speculative=True).start()
    try:
        jobs = _jobs(2)
        got, ends = _run_engine(engine, jobs)
        for (prompt, m), tokens in zip(jobs, got):
            assert tokens == generate_tokens(CFG, params, [prompt],
                                             max_new_tokens=m).tokens[0][len(prompt):]
        assert engine.metrics.value("draft_tokens_total") > 0
        assert "dsv3_acceptance_rate" in engine.metrics.render()
    finally:
        engine.shutdown(timeout=60)


@fresh_process
def test_speculative_accepted_drafts_give_two_tokens_a_step(params):
    """A model whose final norms are zero gives all-zero logits, so the main model and the MTP
    module both pick token 0 and every draft is accepted: each step emits two tokens, streams
    still end at exactly max_new_tokens (odd or even), equal to plain greedy."""
    import jax

    flat = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0 if jax.tree_util.keystr(path).endswith("['norm']['weight']") else x,
        params)
    engine = Engine(CFG, flat, max_batch=2, prefill_chunk=16, speculative=True).start()
    try:
        jobs = [(p, m) for (p, _), m in zip(_jobs(3, 4), (1, 2, 7, 10))]
        got, ends = _run_engine(engine, jobs)
        for (prompt, m), tokens in zip(jobs, got):
            assert tokens == [0] * m
            assert tokens == generate_tokens(CFG, flat, [prompt],
                                             max_new_tokens=m).tokens[0][len(prompt):]
        assert engine.metrics.value("acceptance_rate") == 1.0
    finally:
        engine.shutdown(timeout=60)
    alone = Engine(CFG, flat, max_batch=1, speculative=True).start()
    try:
        _run_engine(alone, [(jobs[0][0], 10)])
        # the prefill gives the first token, then five steps of two
        assert alone.metrics.value("decode_steps_total") == 5
    finally:
        alone.shutdown(timeout=60)


@fresh_process
def test_speculative_sampling_is_seeded_and_stays_in_the_vocabulary(params):
    jobs = _jobs(4, 4)
    runs = []
    for _ in range(2):
        engine = Engine(CFG, params, max_batch=4, speculative=True, vocab_limit=300).start()
        try:
            runs.append(_run_engine(engine, jobs, temperature=1.0, top_p=0.9, seed=5)[0])
        finally:
            engine.shutdown(timeout=60)
    assert runs[0] == runs[1]
    assert all(len(t) == m for t, (_, m) in zip(runs[0], jobs))
    assert max(max(t) for t in runs[0]) < 300


def test_speculative_needs_an_mtp_module(params):
    with pytest.raises(ValueError, match="mtp_depth=0"):
        Engine(CFG.replace(mtp_depth=0), params, speculative=True)


def test_the_per_row_acceptance_rule_leaves_the_target_distribution():
    """Speculative sampling's promise, per row: with drafts drawn from q and accepted with
    min(1, p/q) (else drawn from max(p - q, 0)), the emitted token is distributed as p. 40,000
    rows, each its own seed, a vocabulary of 6, temperature 0.8 and top-p 0.8 on the target (two
    of the six tokens cut);
    each frequency within 5 standard errors of p."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax.serve.engine import _accept, _log_dist

    rng = np.random.default_rng(0)
    b, v = 40_000, 6
    target = rng.normal(size=v).astype(np.float32)
    q = rng.dirichlet(np.ones(v)).astype(np.float32)
    temperature, top_k, top_p = (np.full(b, 0.8, np.float32), np.zeros(b, np.int32),
                                 np.full(b, 0.8, np.float32))
    draft = rng.choice(v, size=b, p=q / q.sum()).astype(np.int32)
    logits = jnp.broadcast_to(jnp.asarray(target), (b, v))
    logq = jnp.broadcast_to(jnp.log(jnp.asarray(q)), (b, v))
    seed, step = np.arange(b, dtype=np.int32), np.ones(b, np.int32)
    accepted, token = jax.jit(_accept, static_argnums=8)(logits, draft, logq, temperature, top_k,
                                                         top_p, seed, step, 0)
    p = np.exp(np.asarray(_log_dist(logits[:1], temperature[:1], top_k[:1], top_p[:1]))[0])
    freq = np.bincount(np.asarray(token), minlength=v) / b
    stderr = np.sqrt(p * (1 - p) / b) + 1e-9
    assert np.all(np.abs(freq - p) <= 5 * stderr), (freq, p)
    assert (p == 0).sum() == 2 and freq[p == 0].sum() == 0  # the cut tokens never come out
    assert 0 < np.asarray(accepted).mean() < 1


def test_a_request_that_waits_past_the_queue_timeout_gets_503(params):
    """A request that has waited longer than queue_timeout when the scheduler looks at it ends
    with QueueTimeout (HTTP 503) instead of running (its arrival set 10 s back, so the test
    does not race the machine's speed)."""
    import queue

    from dsv3_jax.serve.engine import QueueTimeout

    engine = Engine(CFG, params, max_batch=1, queue_timeout=1.0).start()
    try:
        events = queue.Queue()
        engine.submit(Request(prompt=[8, 9], max_new_tokens=2, submitted=time.monotonic() - 10,
                              on_event=lambda kind, v: events.put((kind, v))))
        kind, value = events.get(timeout=300)
        assert kind == "error" and isinstance(value, QueueTimeout) and value.status == 503
        assert "queue_timeout" in value.message
        assert engine.metrics.value("requests_total", status="queue_timeout") == 1
    finally:
        engine.shutdown(timeout=60)
