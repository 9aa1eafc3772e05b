"""Embeddings per second: `zeroserve serve` of the packaged all-MiniLM-L6-v2 against
sentence-transformers' own encode(), on this machine, with the same inputs and thread count.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_embeddings.py --threads 2 --inputs 512

Rows (embeddings/s, higher is better):
    batch 1     zeroserve: one input per request, one request after another (the HTTP round trip,
                tokenization and a one-input step each time); ST: encode(batch_size=1)
    batch 64    zeroserve: 64 inputs per request (one step each); ST: encode(batch_size=64)
    64 clients  zeroserve only: 64 concurrent clients each sending one input at a time (the
                scheduler forms the batches, as it would for independent users)

The inputs are synthetic English-like sentences of 4 to 120 words (seeded), so a batch mixes
lengths as real traffic does; ST pads each batch to its longest input, zeroserve pads only
inside attention. Before timing, the vectors of both are compared (min cosine printed).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from zeroserve.shared.model_files import packaged_embedding_model

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be "
    "or has had not but its their they have one all been new more also who first after two would "
    "other into time most over only some than year city state world music system team season film "
    "river company series house school people government embedding vector search query document"
).split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 120))).capitalize() + "." for _ in range(n)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive connection (http.client), base64 vectors (as the openai client asks)."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def embed(self, texts: list[str]) -> np.ndarray:
        body = json.dumps({"input": texts, "encoding_format": "base64"})
        self.conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {data}")
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data["data"]])


def start(model: str, threads: int, port: int, log_path: str) -> subprocess.Popen:
    exe = os.path.join(os.path.dirname(sys.executable), "zeroserve")
    cmd = [exe, "serve", model, "--port", str(port), "--num-threads", str(threads)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"zeroserve exited ({proc.returncode}); see {log_path}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/ready")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"zeroserve was not ready in 300 s; see {log_path}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--threads", type=int, default=2, help="torch threads for both (zeroserve: --num-threads)"
    )
    ap.add_argument("--inputs", type=int, default=512, help="inputs per measurement (batch 1 uses a quarter)")
    args = ap.parse_args()
    model = packaged_embedding_model()
    texts = sentences(args.inputs)
    single = texts[: max(16, args.inputs // 4)]

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    st = SentenceTransformer(model, device="cpu")
    st.encode(texts[:64], batch_size=64)  # warm-up
    t = time.perf_counter()
    want1 = st.encode(single, batch_size=1)
    st_1 = time.perf_counter() - t
    t = time.perf_counter()
    want = st.encode(texts, batch_size=64)
    st_64 = time.perf_counter() - t

    port = free_port()
    log_path = os.path.join(tempfile.gettempdir(), f"bench-embeddings-{port}.log")
    proc = start(model, args.threads, port, log_path)
    try:
        client = Client(port)
        client.embed(texts[:64])  # warm-up (first-step packing of the weights)
        t = time.perf_counter()
        got1 = np.concatenate([client.embed([x]) for x in single])
        zs_1 = time.perf_counter() - t
        t = time.perf_counter()
        got = np.concatenate([client.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)])
        zs_64 = time.perf_counter() - t

        def one_client(w: int) -> None:  # client w sends inputs w, w + 64, ... one at a time
            c = Client(port)
            for x in texts[w::64]:
                c.embed([x])

        t = time.perf_counter()
        with ThreadPoolExecutor(64) as pool:
            list(pool.map(one_client, range(64)))
        zs_c = time.perf_counter() - t
    finally:
        stop(proc)
    cos = min(float((got * want).sum(1).min()), float((got1 * want1).sum(1).min()))
    print(
        f"all-MiniLM-L6-v2, {args.threads} threads, {len(texts)} inputs of 4-120 words; min cosine {cos:.6f}"
    )
    print(f"{'embeddings/s':<14}{'zeroserve':>10}{'sentence-transformers':>24}")
    print(f"{'batch 1':<14}{rate(len(single), zs_1):>10}{rate(len(single), st_1):>24}")
    print(f"{'batch 64':<14}{rate(len(texts), zs_64):>10}{rate(len(texts), st_64):>24}")
    print(f"{'64 clients':<14}{rate(len(texts), zs_c):>10}{'-':>24}")


if __name__ == "__main__":
    main()
