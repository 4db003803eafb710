"""A bounded load test of `treeflash serve` on loopback: requests/s, tokens/s and latency percentiles at
concurrency 1, 4 and 8, for one-at-a-time serving (--max-batch 1) against batched rounds (--max-batch 8).

    python scripts/load_test.py --out OUT                        # starts both servers itself, then stops them
    python scripts/load_test.py --out OUT --method treeflash --max-tokens 24
    python scripts/load_test.py --out OUT --url http://127.0.0.1:8000   # one server that is already running

Each level sends --requests streamed chat completions (greedy, `ignore_eos`, so each yields exactly
--max-tokens tokens) from that many client threads at once. The two servers run side by side and take turns
level by level, so that both see the same machine. Everything stays on 127.0.0.1 and the run is bounded:
--time-limit seconds in all, after which no request is started (unfinished levels are marked so).

Numbers (per level): requests/s = requests / wall seconds of the level; tokens/s = completion tokens of all
requests / wall seconds; latency = request sent -> last byte; TTFT = request sent -> first text. Writes
OUT.json and OUT.md. Needs the `serve` extra (starlette, uvicorn) and the `openai` client.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import torch

from treeflash.api import SHIPPED_DRAFTERS
from treeflash.machine import cpu_model
from treeflash.targets import DEFAULT_TARGET

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PROMPTS = [
    "Write a haiku about the sea.",
    "Explain what a KV cache is in two sentences.",
    "Give three tips for writing clear error messages.",
    "What is the capital of France, and why is it famous?",
    "Describe a sunrise to someone who has never seen one.",
    "List four uses of a paperclip.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Why do cats purr?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`treeflash serve` in a subprocess on a free loopback port; stopped on exit."""

    def __init__(self, args, max_batch: int, log_dir: Path):
        self.max_batch, self.port = max_batch, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "treeflash.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--method", args.method, "--max-batch", str(max_batch), "--max-queue", "64"]
        if args.target:
            command += ["--target", args.target]
        if args.drafter:
            command += ["--drafter", args.drafter]
        self.log = open(log_dir / f"serve-max-batch-{max_batch}.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.flush()
                tail = "".join(Path(self.log.name).read_text().splitlines(keepends=True)[-15:])
                raise SystemExit(f"the server exited ({self.process.returncode}); the end of {self.log.name}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise SystemExit(f"the server did not start in time; see {self.log.name}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def model_id(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def one_request(client: openai.OpenAI, model: str, prompt: str, args) -> dict:
    start = time.perf_counter()
    first = None
    text, last = [], None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens, temperature=0,
        stream=True, extra_body={"ignore_eos": True, "method": args.method},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        last = chunk
    end = time.perf_counter()
    stats = last.model_extra["treeflash"]
    return {"latency": end - start, "ttft": (first or end) - start, "completion_tokens": last.usage.completion_tokens,
            "tau": stats["tau"], "queue_seconds": stats["queue_seconds"], "text": "".join(text)}


def run_level(url: str, model: str, concurrency: int, args, deadline: float) -> dict:
    """`args.requests` requests from `concurrency` threads; returns the level's figures."""
    results, errors, lock = [], [], threading.Lock()
    todo = list(range(args.requests))

    def worker():
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=args.request_timeout)
        while True:
            with lock:
                if not todo or time.monotonic() > deadline:
                    return
                i = todo.pop(0)
            try:
                r = one_request(client, model, PROMPTS[i % len(PROMPTS)], args)
                r["prompt"] = i % len(PROMPTS)
                with lock:
                    results.append(r)
            except Exception as e:  # counted and reported; the run goes on
                with lock:
                    errors.append(repr(e))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.request_timeout * args.requests)
    wall = time.perf_counter() - start

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else None

    latency = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["completion_tokens"] for r in results)
    return {
        "concurrency": concurrency, "requests": len(results), "errors": errors,
        "complete": len(results) == args.requests, "wall_seconds": wall,
        "requests_per_second": len(results) / wall, "tokens_per_second": tokens / wall,
        "latency_p50": pct(latency, 0.5), "latency_p90": pct(latency, 0.9), "latency_p99": pct(latency, 0.99),
        "latency_max": max(latency, default=None),
        "ttft_p50": pct(ttft, 0.5), "ttft_p90": pct(ttft, 0.9), "ttft_p99": pct(ttft, 0.99),
        "ttft_max": max(ttft, default=None),
        "tau_mean": statistics.mean(r["tau"] for r in results if r["tau"] is not None) if results else None,
        "completion_tokens": tokens,
        "texts": {r["prompt"]: r["text"] for r in results},
    }


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {gpu}"


def same_texts(level: dict, reference: dict | None) -> str:
    """How many of the level's prompts got the text they got at concurrency 1 (greedy: all should)."""
    if reference is None:
        return "–"
    shared = [k for k in level["texts"] if k in reference["texts"]]
    same = sum(level["texts"][k] == reference["texts"][k] for k in shared)
    return f"{same}/{len(shared)}"


def markdown(report: dict) -> str:
    a = report["settings"]
    lines = [
        f"# Load test of `treeflash serve` ({report['model']}, method {a['method']}, drafter {report['drafter']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}. Load on the machine from other work while measuring: "
        f"{report['load_average']} (1-minute load average before and after).",
        "",
        f"Each level: {a['requests']} streamed chat completions, greedy, exactly {a['max_tokens']} new tokens each "
        "(`ignore_eos`), sent from as many client threads as the concurrency. tokens/s = completion tokens / wall "
        "time of the level; x c1 = tokens/s over the same server's at concurrency 1; latency = request to last "
        "byte; TTFT = request to first text. Seconds. (p99 of a level's few requests is close to its maximum.)",
        "",
        "| serving | concurrency | requests | requests/s | tokens/s | x c1 | latency p50 | p99 | TTFT p50 | p99 | tau "
        "| texts as at c1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in report["modes"]:
        c1 = next((lv for lv in mode["levels"] if lv["concurrency"] == 1 and lv["requests"]), None)
        base = c1["tokens_per_second"] if c1 else None
        for lv in mode["levels"]:
            if not lv["requests"]:
                lines.append(f"| {mode['name']} | {lv['concurrency']} | 0 (time limit) |" + " – |" * 9)
                continue
            f = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
            ratio = f"{lv['tokens_per_second'] / base:.2f}x" if base else "–"
            lines.append(
                f"| {mode['name']} | {lv['concurrency']} | {lv['requests']}{'' if lv['complete'] else ' (incomplete)'} "
                f"| {lv['requests_per_second']:.3f} | {lv['tokens_per_second']:.1f} | {ratio} | {f(lv['latency_p50'])} "
                f"| {f(lv['latency_p99'])} | {f(lv['ttft_p50'])} | {f(lv['ttft_p99'])} | {f(lv['tau_mean'])} "
                f"| {same_texts(lv, c1)} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server on loopback (default: start servers here)")
    p.add_argument("--target", default=None, help="target for the servers started here (default: SmolLM2)")
    p.add_argument("--drafter", default=None,
                   help="drafter for the servers started here (default: the shipped one, else 'untrained')")
    p.add_argument("--method", default="ar",
                   help="decoding method of every request (default: ar: with an untrained drafter tau is 1, so the "
                        "speculative methods commit the same tokens at a higher cost per round)")
    p.add_argument("--concurrency", default="1,4,8", help="client threads per level (default: 1,4,8)")
    p.add_argument("--max-batch", default="1,8",
                   help="servers started here: their --max-batch, 1 = one at a time (default: 1,8)")
    p.add_argument("--requests", type=int, default=16, help="requests per level (default: 16)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    p.add_argument("--time-limit", type=float, default=600, help="seconds for the whole run (default: 600)")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds per request (default: 300)")
    p.add_argument("--out", required=True, help="output path without extension: writes OUT.json and OUT.md")
    args = p.parse_args()

    if args.url and urllib.parse.urlparse(args.url).hostname not in LOOPBACK:
        raise SystemExit("--url must be on this machine (127.0.0.1, localhost or ::1)")
    shipped = SHIPPED_DRAFTERS.get(DEFAULT_TARGET)
    if args.drafter is None and args.target is None:
        args.drafter = None if shipped and (shipped / "config.json").exists() else "untrained"
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    deadline = time.monotonic() + args.time_limit
    load_before = os.getloadavg()[0]

    servers, log_dir = [], Path(tempfile.mkdtemp(prefix="treeflash-load-"))
    try:
        if args.url:
            modes = [{"name": "running server", "url": args.url.rstrip("/")}]
        else:
            for k in (int(m) for m in args.max_batch.split(",")):
                servers.append(ServeProcess(args, k, log_dir))
            for s in servers:
                s.wait_ready(deadline)
            modes = [{"name": "one at a time (max_batch 1)" if s.max_batch == 1 else f"batched (max_batch {s.max_batch})",
                      "url": s.url} for s in servers]
        model = model_id(modes[0]["url"])
        for mode in modes:  # warm-up: first-call costs stay out of the figures
            one_request(openai.OpenAI(base_url=mode["url"] + "/v1", api_key="x", max_retries=0), model, PROMPTS[0],
                        argparse.Namespace(**{**vars(args), "max_tokens": 8}))
            mode["levels"] = []
        for c in concurrencies:  # the modes take turns level by level, so that both see the same machine
            for mode in modes:
                level = run_level(mode["url"], model, c, args, deadline)
                mode["levels"].append(level)
                print(f"{mode['name']:>28} | concurrency {c} | {level['requests']} requests | "
                      f"{level['requests_per_second']:.3f} req/s | {level['tokens_per_second']:.1f} tok/s | "
                      f"latency p50 {level['latency_p50']} | TTFT p50 {level['ttft_p50']}", flush=True)
    finally:
        for s in servers:
            s.stop()

    report = {
        "command": " ".join(["python scripts/load_test.py", *sys.argv[1:]]),
        "machine": machine(),
        "load_average": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
        "model": model,
        "drafter": args.drafter or ("shipped" if not args.url else "as served"),
        "settings": {k: getattr(args, k) for k in ("method", "requests", "max_tokens", "concurrency", "max_batch",
                                                   "time_limit")},
        "modes": [{"name": m["name"], "levels": m["levels"]} for m in modes],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
