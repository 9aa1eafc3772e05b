"""`zeroserve models`: the model registry of a running server, through its admin API.

    zeroserve models list                                  every model, version, state, weight, live stats
    zeroserve models load NAME VERSION [--path P] [--option K=V ...] [--weight N]
    zeroserve models unload NAME VERSION                   drain, then unload
    zeroserve models traffic NAME v1=90 v2=10              set the weights (new requests only)
    zeroserve models canary NAME VERSION [--steps 5,25,50,100] [--interval-s 30]
                            [--max-error-rate 0.01] [--max-ttft-p95-s 2]
    zeroserve models rollback NAME                         the stable version gets all traffic

Every command takes --url (default http://127.0.0.1:8000) and the admin key (--admin-key or
ZEROSERVE_ADMIN_KEY). Answers print as JSON (list: a table; --json for the JSON); an error
prints its message and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def add_parser(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list, load, unload models and versions of a running server; traffic, canary, rollback",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ops = p.add_subparsers(dest="op", required=True)

    def op(name: str, help_: str) -> argparse.ArgumentParser:
        q = ops.add_parser(name, help=help_)
        q.add_argument(
            "--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)"
        )
        q.add_argument(
            "--admin-key", default=None, help="the server's --admin-key (default: ZEROSERVE_ADMIN_KEY)"
        )
        q.add_argument(
            "--timeout", type=float, default=60.0, help="seconds to wait for the answer (default 60)"
        )
        return q

    q = op("list", "every model and version with its state, weight and live stats")
    q.add_argument("--json", action="store_true", help="print the JSON as received")
    q = op("load", "load a new version (in the background: `list` shows loading, then ready or failed)")
    q.add_argument("model")
    q.add_argument("version")
    q.add_argument(
        "--path", default=None, help="GGUF file or Hugging Face folder (default: the packaged SmolLM2)"
    )
    q.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an engine option of this version (EngineConfig field; VALUE read as JSON, else a string)",
    )
    q.add_argument(
        "--weight", type=int, default=None, help="its traffic weight (default 0; 100 for a new model)"
    )
    q.add_argument(
        "--fault-error-rate", type=float, default=None, help="testing: fail this share of requests"
    )
    q.add_argument("--fault-latency-ms", type=float, default=None, help="testing: delay every request")
    q = op("unload", "stop routing to a version, let its requests finish, unload it")
    q.add_argument("model")
    q.add_argument("version")
    q = op("traffic", "set the traffic weights of a model's versions")
    q.add_argument("model")
    q.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT")
    q = op("canary", "shift traffic to a version step by step while it meets the SLO; roll back on a breach")
    q.add_argument("model")
    q.add_argument("version")
    q.add_argument("--steps", default=None, help="percentages, e.g. 5,25,50,100")
    q.add_argument("--interval-s", type=float, default=None, help="seconds per step")
    q.add_argument("--max-error-rate", type=float, default=None)
    q.add_argument("--max-ttft-p95-s", type=float, default=None)
    q = op("rollback", "give the stable version all traffic now (cancels a running canary)")
    q.add_argument("model")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def request_of(args: argparse.Namespace) -> tuple[str, str, dict | None]:
    """(method, path, body) of the admin call for ``args``."""
    quote = urllib.parse.quote
    if args.op == "list":
        return "GET", "/admin/models", None
    base = f"/admin/models/{quote(args.model, safe='')}"
    if args.op == "load":
        body: dict[str, Any] = {"version": args.version}
        if args.path is not None:
            body["path"] = args.path
        options = {}
        for item in args.option:
            key, eq, value = item.partition("=")
            if not eq:
                raise SystemExit(f"zeroserve models: --option {item!r}: write KEY=VALUE")
            options[key] = _value(value)
        if options:
            body["options"] = options
        if args.weight is not None:
            body["weight"] = args.weight
        fault = {}
        if args.fault_error_rate is not None:
            fault["error_rate"] = args.fault_error_rate
        if args.fault_latency_ms is not None:
            fault["latency_ms"] = args.fault_latency_ms
        if fault:
            body["fault"] = fault
        return "POST", f"{base}/versions", body
    if args.op == "unload":
        return "DELETE", f"{base}/versions/{quote(args.version, safe='')}", None
    if args.op == "traffic":
        weights = {}
        for item in args.weights:
            version, eq, weight = item.partition("=")
            try:
                weights[version] = int(weight)
            except ValueError:
                raise SystemExit(f"zeroserve models: {item!r}: write VERSION=WEIGHT (an integer)") from None
            if not eq:
                raise SystemExit(f"zeroserve models: {item!r}: write VERSION=WEIGHT")
        return "PUT", f"{base}/traffic", {"weights": weights}
    if args.op == "canary":
        body = {"version": args.version}
        if args.steps is not None:
            try:
                body["steps"] = [int(s) for s in args.steps.split(",")]
            except ValueError:
                raise SystemExit(
                    "zeroserve models: --steps: integers separated by commas, e.g. 5,25,50,100"
                ) from None
        if args.interval_s is not None:
            body["interval_s"] = args.interval_s
        slo = {}
        if args.max_error_rate is not None:
            slo["max_error_rate"] = args.max_error_rate
        if args.max_ttft_p95_s is not None:
            slo["max_ttft_p95_s"] = args.max_ttft_p95_s
        if slo:
            body["slo"] = slo
        return "POST", f"{base}/canary", body
    return "POST", f"{base}/rollback", None


def call(url: str, key: str, method: str, path: str, body: dict | None, timeout: float) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


def table(listing: dict) -> str:
    """GET /admin/models as one row per version."""
    cols = (
        "MODEL",
        "VERSION",
        "STATE",
        "WEIGHT",
        "STABLE",
        "REQUESTS",
        "ERRORS",
        "TTFT_P50",
        "TTFT_P95",
        "NOTE",
    )
    rows = []
    for m in listing.get("data", []):
        canary = m.get("canary") or {}
        for v in m.get("versions", []):
            s = v.get("stats") or {}

            def seconds(x: Any) -> str:
                return "-" if x is None else f"{x:.3f}s"

            note = v.get("reason") or ""
            if canary.get("version") == v.get("version"):
                note = f"canary {canary.get('state')} step {canary.get('step')}" + (
                    f": {note}" if note else ""
                )
            rows.append(
                (
                    m.get("name", ""),
                    v.get("version", ""),
                    v.get("state", ""),
                    str(v.get("weight", "")),
                    "*" if v.get("version") == m.get("stable") else "",
                    str(s.get("requests", 0)),
                    str(s.get("errors", 0)),
                    seconds(s.get("ttft_p50_s")),
                    seconds(s.get("ttft_p95_s")),
                    note,
                )
            )
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from zeroserve.shared import env

    key = args.admin_key or env.admin_key()
    if not key:
        print(
            "zeroserve models: give the server's admin key with --admin-key or ZEROSERVE_ADMIN_KEY",
            file=sys.stderr,
        )
        return 1
    method, path, body = request_of(args)
    try:
        status, answer = call(args.url, key, method, path, body, args.timeout)
    except (urllib.error.URLError, OSError) as e:
        print(f"zeroserve models: cannot reach {args.url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    if not 200 <= status < 300:
        err = answer.get("error", {}) if isinstance(answer, dict) else {}
        message = err.get("message") if isinstance(err, dict) else None
        print(f"zeroserve models: HTTP {status}: {message or answer}", file=sys.stderr)
        return 1
    if args.op == "list" and not args.json and isinstance(answer, dict):
        print(table(answer))
    else:
        print(json.dumps(answer, indent=2))
    return 0
