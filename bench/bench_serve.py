"""Serving load test (issue 13): `lmforge serve` with batching on and off, and a peer serving the same
GPT-2-shaped weights, under the method of vLLM's `bench serve` (benchmarks/benchmark_serving.py).

    python bench/bench_serve.py                           # GPT-2 124M shape on this machine (CPU or GPU)
    python bench/bench_serve.py --quick                   # a 2-layer model: a smoke run of the whole method
    python bench/bench_serve.py --concurrency 1,8,32,64 --rates 1,4 --append   # and add the tables to RESULTS.md

Contenders, each its own server process on 127.0.0.1 (a free port), started and stopped here, all loading
the same random-init weights (an lmforge checkpoint and its transformers export, written once under
--work-dir):
  lmforge          `lmforge serve`, continuous batching (--engine.max_batch 64)
  lmforge-nobatch  `lmforge serve --engine.max_batch 1`: one completion at a time, first come first served
  transformers     `GPT2LMHeadModel.generate` behind a plain FastAPI route (`--peer-server`, below): each
                   request runs on its own thread, streaming through a token streamer

Method (vLLM's): random prompts of --input-len token ids, --output-len tokens each (`ignore_eos`, so every
completion has exactly that length), temperature 1, streamed (server-sent events). Two kinds of level:
  concurrency C   C clients, each sends its next request when the last one ended (vLLM's --max-concurrency
                  with an infinite request rate)
  rate R          requests arrive as a Poisson process of R per second, however many are in flight
Per level: TTFT (send to the first streamed text) p50/p99, TPOT ((latency - TTFT) / (tokens - 1)) p50/p99,
output tokens/s (tokens of completed requests over the level's wall time), completed requests and errors.
Bounded: --num-prompts per level (default: --rounds (2) x C, at least 8; --rate-prompts for rates) and
--level-seconds (no request starts after it; requests still running at twice it are cut off, their
clients hang up, and they count as "cut off", not as completed or errors); loopback only. Every server
runs torch on --threads threads (default 1: the machine these figures come from is shared).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from common import append_results, markdown_table

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # GPT-2 124M, and a small model for --quick
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768),
    "tiny": dict(vocab_size=4096, block_size=512, n_layer=2, n_head=4, d_model=128),
}


# ---- the weights ---------------------------------------------------------------------------------------------
def build_weights(work: Path, shape: str) -> tuple[Path, Path]:
    """(lmforge checkpoint, transformers directory) of one random-init GPT, written once."""
    ckpt, hf = work / shape / "lmforge", work / shape / "hf"
    if (ckpt / "model.safetensors").is_file() and (hf / "config.json").is_file():
        return ckpt, hf
    import torch

    from lmforge.config import to_dict
    from lmforge.interop.hf import export_hf
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.recipes.quickstart import stdlib_files
    from lmforge.text.tokenizer import train_tokenizer
    from lmforge.train.checkpoint import save_checkpoint

    cfg = SHAPES[shape]
    print(f"building {shape} weights and a {cfg['vocab_size']}-token BPE tokenizer in {work / shape} ...", flush=True)
    tok = train_tokenizer(stdlib_files(12), kind="bpe", vocab_size=cfg["vocab_size"], min_frequency=1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg))
    save_checkpoint(ckpt, model=model, config={"arch": "gpt", "model": to_dict(model.config)}, tokenizer=tok)
    export_hf(model, tok, hf)
    return ckpt, hf


# ---- servers ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as a subprocess; ready when /healthz answers 200."""

    def __init__(self, name: str, args: list[str], log: Path, threads: int):
        self.name, self.port = name, free_port()
        self.log = log.open("w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, *args, "--port", str(self.port)], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {log}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def contenders(ckpt: Path, hf: Path, max_len: int, names: list[str]) -> dict[str, list[str]]:
    serve = ["-m", "lmforge", "serve", f"gpt={ckpt}", "--engine.max_model_len", str(max_len),
             "--limits.max_queue", "4096", "--limits.deadline_s", "3600", "--log_level", "warning"]
    table = {"lmforge": serve + ["--engine.max_batch", "64"],
             "lmforge-nobatch": serve + ["--engine.max_batch", "1"],
             "transformers": [str(Path(__file__).resolve()), "--peer-server", str(hf)]}
    return {n: table[n] for n in names}


# ---- the client (vLLM's method; a small asyncio HTTP/1.1 client so that it costs the machine little) ------
async def stream_completion(port: int, body: dict) -> dict:
    """Send one streaming completion; {ok, ttft, latency, tokens, error}."""
    start = time.perf_counter()
    data = json.dumps(body).encode()
    ttft, tokens, error, writer = None, 0, None, None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            error = f"HTTP {status}: {(await reader.read())[:200]!r}"
        else:
            buffer = b""
            while True:
                size = int((await reader.readline()).strip() or b"0", 16)  # chunked transfer encoding
                if size == 0:
                    break
                buffer += (await reader.readexactly(size + 2))[:-2]
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    payload = event[6:] if event.startswith(b"data: ") else b""
                    if not payload or payload == b"[DONE]":
                        continue
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        error = chunk["error"]["message"]
                    if chunk.get("choices") and chunk["choices"][0].get("text") and ttft is None:
                        ttft = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    finally:  # also when the level's hard stop cancels this request: the server sees the disconnect
        if writer is not None:
            writer.close()
    latency = time.perf_counter() - start
    ok = error is None and tokens > 0 and ttft is not None
    return {"ok": ok, "ttft": ttft, "latency": latency, "tokens": tokens, "error": error}


def prompts(n: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(n)]


def body(prompt: list[int], output_len: int) -> dict:
    return {"model": "gpt", "prompt": prompt, "max_tokens": output_len, "temperature": 1.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


UNFINISHED = {"ok": False, "unfinished": True, "ttft": None, "latency": 0.0, "tokens": 0, "error": None}


async def _finish(tasks: list[asyncio.Task], hard_stop: float) -> None:
    """Wait for `tasks` until `hard_stop` (perf_counter); cancel the rest (their clients hang up)."""
    _, pending = await asyncio.wait(tasks, timeout=max(hard_stop - time.perf_counter(), 0))
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def run_concurrency(port: int, batch: list[list[int]], output_len: int, clients: int, seconds: float):
    """`clients` clients, each sending its next request when its last one ended; none starts after
    `seconds`, and what still runs at 2 x `seconds` is cut off (counted as unfinished)."""
    queue, results = list(batch), []
    start = time.perf_counter()

    async def client():
        while queue and time.perf_counter() - start < seconds:
            prompt = queue.pop(0)
            try:
                results.append(await stream_completion(port, body(prompt, output_len)))
            except asyncio.CancelledError:
                results.append(dict(UNFINISHED))
                raise

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await _finish(tasks, start + 2 * seconds)
    return results, time.perf_counter() - start


async def run_rate(port: int, batch: list[list[int]], output_len: int, rate: float, seconds: float, seed: int):
    """Requests arriving as a Poisson process of `rate` per second (bounded as in run_concurrency)."""
    rng = random.Random(seed)
    tasks, results, start = [], [], time.perf_counter()

    async def one(prompt):
        try:
            results.append(await stream_completion(port, body(prompt, output_len)))
        except asyncio.CancelledError:
            results.append(dict(UNFINISHED))
            raise

    for p in batch:
        if time.perf_counter() - start > seconds:
            break
        tasks.append(asyncio.create_task(one(p)))
        await asyncio.sleep(rng.expovariate(rate))
    await _finish(tasks, start + 2 * seconds)
    return results, time.perf_counter() - start


def summarize(results: list[dict], wall: float) -> dict:
    done = [r for r in results if r["ok"]]
    ttft = sorted(r["ttft"] * 1e3 for r in done)
    tpot = sorted((r["latency"] - r["ttft"]) / (r["tokens"] - 1) * 1e3 for r in done if r["tokens"] > 1)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")

    unfinished = sum(1 for r in results if r.get("unfinished"))
    return {"completed": len(done), "unfinished": unfinished, "errors": len(results) - len(done) - unfinished,
            "wall_s": wall,
            "tok_s": sum(r["tokens"] for r in done) / wall if wall > 0 else 0.0,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
            "first_error": next((r["error"] for r in results if r["error"]), None)}


# ---- the peer: transformers behind a plain FastAPI route -------------------------------------------------------
def peer_server(hf_dir: str, port: int) -> None:
    """GPT2LMHeadModel.generate per request, on its own thread, streamed token by token (OpenAI's shape)."""
    import threading

    import torch
    import uvicorn
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.generation.streamers import BaseStreamer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPT2LMHeadModel.from_pretrained(hf_dir).to(device).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(hf_dir) / "tokenizer.json"))
    app = FastAPI()

    class Tokens(BaseStreamer):  # every new token, as soon as generate has it (TextIteratorStreamer waits for words)
        def __init__(self, loop, queue):
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value):
            if not self.prompt_seen:  # generate first hands over the prompt
                self.prompt_seen = True
                return
            self.loop.call_soon_threadsafe(self.queue.put_nowait, value.view(-1).tolist())

        def end(self):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await request.json()
        ids = torch.tensor([req["prompt"]], device=device)
        n = req["max_tokens"]
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        kwargs = dict(max_new_tokens=n, do_sample=req.get("temperature", 1.0) > 0, temperature=req.get("temperature", 1.0),
                      top_k=0, pad_token_id=0, streamer=Tokens(loop, queue), attention_mask=torch.ones_like(ids))
        if req.get("ignore_eos"):
            kwargs["min_new_tokens"] = n

        def run():
            with torch.inference_mode():
                model.generate(ids, **kwargs)

        threading.Thread(target=run, daemon=True).start()

        async def events():
            out: list[int] = []
            sent = 0
            while (new := await queue.get()) is not None:
                out += new
                text = tok.decode(out)
                safe = len(text.rstrip("\ufffd"))
                if safe > sent:
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text[sent:safe]}]})}\n\n"
                    sent = safe
            usage = {"prompt_tokens": ids.size(1), "completion_tokens": len(out), "total_tokens": ids.size(1) + len(out)}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- main --------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 2-layer model instead of the GPT-2 124M shape")
    ap.add_argument("--contenders", default="lmforge,lmforge-nobatch,transformers")
    ap.add_argument("--concurrency", default="1,8,32,64", help="client counts ('' for none)")
    ap.add_argument("--rates", default="1,4", help="Poisson request rates per second ('' for none)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=0, help="per concurrency level (default: --rounds x C, at least 8)")
    ap.add_argument("--rounds", type=int, default=2, help="prompts per client at a concurrency level (see --num-prompts)")
    ap.add_argument("--rate-prompts", type=int, default=24, help="per rate level")
    ap.add_argument("--level-seconds", type=float, default=120.0,
                    help="no request starts later than this in a level; what runs at twice this is cut off")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every server (OMP_NUM_THREADS)")
    ap.add_argument("--work-dir", default="/tmp/lmforge_bench_serve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--append", action="store_true", help="append the tables to bench/RESULTS.md")
    ap.add_argument("--peer-server", metavar="HF_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_server:
        return peer_server(args.peer_server, args.port)

    shape = "tiny" if args.quick else "gpt2"
    work = Path(args.work_dir)
    ckpt, hf = build_weights(work, shape)
    vocab = SHAPES[shape]["vocab_size"]
    levels = [("c", int(c)) for c in args.concurrency.split(",") if c] + [("r", float(r)) for r in args.rates.split(",") if r]
    max_len = args.input_len + args.output_len
    rows, figures = [], {}
    for name, cmd in contenders(ckpt, hf, max_len, args.contenders.split(",")).items():
        print(f"starting {name} ...", flush=True)
        server = ServerProcess(name, cmd, work / f"{name}.log", args.threads)
        try:
            asyncio.run(stream_completion(server.port, body(prompts(1, args.input_len, vocab, 999)[0], 8)))  # warm-up
            for kind, value in levels:
                n = (args.num_prompts or max(8, args.rounds * int(value))) if kind == "c" else args.rate_prompts
                batch = prompts(n, args.input_len, vocab, args.seed)
                if kind == "c":
                    results, wall = asyncio.run(run_concurrency(server.port, batch, args.output_len, int(value),
                                                                args.level_seconds))
                else:
                    results, wall = asyncio.run(run_rate(server.port, batch, args.output_len, value,
                                                         args.level_seconds, args.seed))
                s = summarize(results, wall)
                level = f"{value} clients" if kind == "c" else f"{value:g} req/s"
                figures[(name, kind, value)] = s
                rows.append([name, level, f"{s['completed']}/{len(results)}", s["unfinished"], s["errors"],
                             f"{s['wall_s']:.1f}",
                             f"{s['tok_s']:.1f}", f"{s['ttft_p50']:.0f}", f"{s['ttft_p99']:.0f}",
                             f"{s['tpot_p50']:.1f}", f"{s['tpot_p99']:.1f}"])
                print(" | ".join(str(x) for x in rows[-1]) + (f"  (first error: {s['first_error']})" if s["errors"] else ""),
                      flush=True)
        finally:
            server.stop()

    header = ["server", "level", "completed", "cut off", "errors", "wall s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms",
              "TPOT p50 ms", "TPOT p99 ms"]
    lines = markdown_table(header, rows)
    notes = []

    def tps(name, c):
        s = figures.get((name, "c", c))
        return s["tok_s"] if s else None

    for c in (32, 64):
        a, one, nob, peer = tps("lmforge", c), tps("lmforge", 1), tps("lmforge-nobatch", c), tps("transformers", c)
        if a and one:
            notes.append(f"lmforge at {c} clients: {a / one:.2f}x its single-client output tokens/s")
        if a and nob:
            notes.append(f"lmforge at {c} clients: {a / nob:.2f}x lmforge with batching off")
        if a and peer:
            notes.append(f"lmforge at {c} clients: {a / peer:.2f}x transformers behind FastAPI")
    errors64 = {n: s["errors"] for (n, k, v), s in figures.items() if k == "c" and v == 64}
    if errors64:
        notes.append("errors at 64 clients: " + ", ".join(f"{n} {e}" for n, e in errors64.items()))
    text = "\n".join(lines + [""] + [f"- {n}" for n in notes])
    print("\n" + text)
    if args.append:
        command = "python bench/bench_serve.py " + " ".join(sys.argv[1:]).replace(" --append", "").replace("--append", "")
        load = os.getloadavg()[0]
        append_results(f"Serving load test, issue 13 (`{command.strip()}`)",
                       f"{shape} shape, prompts of {args.input_len} random token ids, {args.output_len} output tokens "
                       f"(ignore_eos), temperature 1, streamed; every server on {args.threads} torch thread(s) "
                       f"(the line above is the client's); 1-minute load average at the end {load:.1f}.\n\n" + text)


if __name__ == "__main__":
    main()
