"""`bench sweep`: the serve benchmark at several concurrencies for several servers.

Every target gets the same prompts at a given concurrency (built once, with one tokenizer),
so the servers are compared on identical work. A target that cannot be reached is recorded
with its error and the sweep goes on with the others.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys

from zeroserve.launcher.bench.client import first_model_id
from zeroserve.launcher.bench.datasets import load_counter
from zeroserve.launcher.bench.runner import (
    ServeConfig,
    _config_dict,
    headers_for,
    make_session,
    prepare_requests,
    run_serve,
)

SCHEMA = "zeroserve-bench-sweep/1"


def parse_target(spec: str) -> tuple[str, str]:
    """'NAME=URL' -> (NAME, URL)."""
    name, sep, url = spec.partition("=")
    if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
        raise ValueError(f"bad --target {spec!r}: use NAME=http://HOST:PORT")
    return name.strip(), url.strip()


def prompts_for(concurrency: int, num_prompts: int | None) -> int:
    """--num-prompts per level, or by default four rounds of the concurrency (at least 8)."""
    return num_prompts if num_prompts else max(8, 4 * concurrency)


async def _model_of(base: ServeConfig, url: str) -> str:
    if base.model:
        return base.model
    async with make_session(base) as session:
        return await first_model_id(session, url, headers_for(base.api_key))


async def run_sweep(
    targets: list[tuple[str, str]],
    concurrencies: list[int],
    base: ServeConfig,
    num_prompts: int | None = None,
) -> dict:
    """Returns the sweep JSON (see report.py)."""
    out_targets = [{"name": n, "base_url": u, "model": None, "error": None, "runs": []} for n, u in targets]
    for t in out_targets:
        try:
            t["model"] = await _model_of(base, t["base_url"])
        except RuntimeError as e:
            t["error"] = str(e)
            print(f"zeroserve bench: target {t['name']} skipped: {e}", file=sys.stderr)
    live = [t for t in out_targets if not t["error"]]
    counter = load_counter(base.tokenizer, live[0]["model"] if live else None)
    for c in concurrencies:
        cfg = dataclasses.replace(base, max_concurrency=c, num_prompts=prompts_for(c, num_prompts))
        requests, warmups = prepare_requests(cfg, counter)
        for t in live:
            if t["error"]:
                continue
            print(
                f"zeroserve bench: {t['name']} at concurrency {c} ({cfg.num_prompts} prompts)",
                file=sys.stderr,
            )
            run_cfg = dataclasses.replace(cfg, base_url=t["base_url"], model=t["model"])
            try:
                result = await run_serve(run_cfg, requests, warmups, counter)
            except RuntimeError as e:  # the server went away or rejects our requests
                t["error"] = f"at concurrency {c}: {e}"
                print(f"zeroserve bench: target {t['name']} stopped: {e}", file=sys.stderr)
                continue
            result.pop("per_request")
            t["runs"].append({"concurrency": c, **result})
    config = _config_dict(base)
    config.pop("base_url")
    config.pop("max_concurrency")
    config["num_prompts"] = num_prompts
    return {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "concurrency": list(concurrencies),
        "tokenizer": counter.name,
        "config": config,
        "targets": out_targets,
    }
