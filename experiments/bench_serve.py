"""Serving throughput and latency: concurrent streaming clients against `python -m dsv3_jax.serve`.

  python -m dsv3_jax.serve --checkpoint=runs/tiny_sft --port=8000 &      # a running server
  python experiments/bench_serve.py --url=http://127.0.0.1:8000 --clients=1,8 --requests=32
  python experiments/bench_serve.py --launch=runs/tiny_sft --max_batch=8  # starts and stops one
  python experiments/bench_serve.py --launch=<checkpoint> --smoke          # does it run?

For each client count C in --clients, C threads each send streaming chat completions one after
another (greedy, --max_tokens each, prompts of about --prompt_words words, each a different
text), --requests in all (or until --duration seconds have passed), and the table gives per C:
completed requests, generated tokens (from each response's usage), tokens/s over the whole
wall time (after one untimed pass of the same requests that compiles every shape), time to first token (TTFT: from sending to the first content delta) and inter-token
latency (ITL: between consecutive content deltas of one stream) at p50 / p99. C=1 without
speculation is the sequential baseline of the speed-up column. Only a server on
127.0.0.1 / localhost is accepted: this script sends bounded load to your own machine only.

With --launch, --speculative=both (the default) runs every client count against a server
without and then one with MTP speculation (`--speculative`), and the table says which, with the
server's draft acceptance rate; =on / =off runs one. With --url the server is as it was started.
H100:
  python experiments/bench_serve.py --launch=<checkpoint of the small preset> --max_batch=32 \\
    --clients=1,8,32 --requests=128 --max_tokens=256
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import httpx
import numpy as np

SCRIPT = "bench_serve"
WORDS = ("the json format holds objects arrays strings numbers and an email address has a local "
         "part and a domain while a header names the sender the receiver and the subject").split()


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2."""


def _prompt(i: int, words: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=words)) + f" ({i})"


def _one(client: httpx.Client, url: str, model: str, i: int, args) -> dict:
    messages = [{"role": "user", "content": _prompt(i, args.prompt_words)}]
    body = {"model": model, "messages": messages,
            "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens = [], 0
    with client.stream("POST", url + "/v1/chat/completions", json=body,
                       timeout=args.timeout) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"status {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
    return {"ttft": (stamps[0] - start) if stamps else None,
            "itl": list(np.diff(stamps)), "tokens": tokens}


def run_load(url: str, model: str, clients: int, args) -> dict:
    """`clients` threads sending requests in turn until --requests are done or --duration."""
    counter, lock, results, errors = iter(range(args.requests)), threading.Lock(), [], []
    deadline = time.perf_counter() + args.duration

    def worker():
        with httpx.Client() as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    results.append(_one(client, url, model, i, args))
                except (httpx.HTTPError, RuntimeError) as e:
                    errors.append(str(e))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    pct = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if xs else float("nan")
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": len(errors),
            "first_error": errors[0] if errors else "", "tokens": tokens, "wall": wall,
            "tok_s": tokens / wall if wall > 0 else 0.0, "ttft50": pct(ttft, 50),
            "ttft99": pct(ttft, 99), "itl50": pct(itl, 50), "itl99": pct(itl, 99)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, speculative: bool) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "dsv3_jax.serve", f"--checkpoint={args.launch}",
           f"--port={port}", f"--max_batch={args.max_batch}", f"--speculative={speculative}"]
    if args.max_seq_len:
        cmd.append(f"--max_seq_len={args.max_seq_len}")
    log = open(os.path.join(args.log_dir, "bench_serve_server.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {args.startup_timeout:g} s")


def _check_url(url: str) -> str:
    parts = urllib.parse.urlparse(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
        raise UsageError(f"{SCRIPT}: --url={url!r}; only a server on http://127.0.0.1 or "
                         "http://localhost is accepted (this sends load to that machine).")
    return url.rstrip("/")


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"{SCRIPT}: {flag}={text!r}; give positive integers, e.g. 1,8")
    return values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="", help="a running server (127.0.0.1 / localhost only)")
    ap.add_argument("--launch", default="", help="a checkpoint to start a server with")
    ap.add_argument("--max_batch", type=int, default=8, help="--launch: the server's batch slots")
    ap.add_argument("--max_seq_len", type=int, default=0, help="--launch: positions per stream")
    ap.add_argument("--speculative", default="both", choices=("both", "on", "off"),
                    help="--launch: servers without and/or with MTP speculation")
    ap.add_argument("--clients", default="1,8", help="client counts to run, e.g. 1,8,32")
    ap.add_argument("--requests", type=int, default=32, help="requests per client count")
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--prompt_words", type=int, default=24)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds per client count, "
                    "at most")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--startup_timeout", type=float, default=300.0)
    ap.add_argument("--log_dir", default=".", help="--launch: where the server's log goes")
    ap.add_argument("--smoke", action="store_true", help="1 and 2 clients, 4 requests of 4 tokens")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"{SCRIPT}: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    if bool(args.url) == bool(args.launch):
        raise UsageError(f"{SCRIPT}: give exactly one of --url (a running server) and --launch "
                         "(a checkpoint to serve)")
    for name in ("requests", "max_tokens", "prompt_words", "max_batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"{SCRIPT}: --{name}={getattr(args, name)}; use a positive integer")
    if not (args.duration > 0 and args.timeout > 0):
        raise UsageError(f"{SCRIPT}: --duration and --timeout must be positive seconds")
    clients = _ints(args.clients, "--clients")
    if args.smoke:
        clients, args.requests, args.max_tokens, args.prompt_words = [1, 2], 4, 4, 6
    modes = ({"both": [False, True], "on": [True], "off": [False]}[args.speculative]
             if args.launch else [None])
    rows, rates, model, url = [], {}, "", args.url
    for speculative in modes:
        proc = None
        if args.launch:
            proc, url = _launch(args, speculative)
        else:
            url = _check_url(args.url)
        try:
            model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            # The same requests once at the largest client count first: every prefill width
            # and cache view the measured runs need is compiled before any is timed.
            run_load(url, model, max(clients), args)
            for c in clients:
                rows.append({**run_load(url, model, c, args), "speculative": speculative})
            metrics = httpx.get(url + "/metrics", timeout=30).text
            rates[speculative] = next((line.split()[1] for line in metrics.splitlines()
                                       if line.startswith("dsv3_acceptance_rate")), "-")
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=120)
    print(f"# {SCRIPT}: streaming chat completions against {model} at {url}")
    print(f"# {datetime.datetime.now().isoformat(timespec='minutes')}; "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs; max_tokens "
          f"{args.max_tokens}, prompts of {args.prompt_words} words, greedy")
    print("| MTP speculation | clients | requests | errors | tokens | tok/s | speed-up | "
          "TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | acceptance |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = next((r["tok_s"] for r in rows if r["clients"] == 1 and not r["speculative"]), None)
    for r in rows:
        up = f"{r['tok_s'] / base:.2f}x" if base else "-"
        mode = {None: "as started", False: "off", True: "on"}[r["speculative"]]
        print(f"| {mode} | {r['clients']} | {r['requests']} | {r['errors']} | {r['tokens']} | "
              f"{r['tok_s']:.1f} | {up} | {r['ttft50']:.0f} | {r['ttft99']:.0f} | "
              f"{r['itl50']:.1f} | {r['itl99']:.1f} | {rates[r['speculative']]} |")
    failed = [r for r in rows if r["errors"]]
    for r in failed:
        print(f"# {r['clients']} clients: {r['errors']} errors, first: {r['first_error']}",
              file=sys.stderr)
    return 1 if failed or not all(r["requests"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
