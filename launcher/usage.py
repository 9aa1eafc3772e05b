"""`zeroserve usage`: what each tenant (model, version, day) consumed, from a server's admin API.

Reads ``GET /admin/usage`` of the server at --url with the admin key (``--admin-key`` or
ZEROSERVE_ADMIN_KEY) and prints a table, CSV or the JSON as received. Times: unix seconds or
ISO 8601 (no zone: UTC), as the API takes them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

COLUMNS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "usage",
        help="print per-tenant usage (requests, tokens) from a server's audit trail",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)"
    )
    p.add_argument(
        "--admin-key", default=None, help="the server's --admin-key (default: ZEROSERVE_ADMIN_KEY)"
    )
    p.add_argument("--since", default=None, help="from this time on (unix seconds or ISO 8601)")
    p.add_argument("--until", default=None, help="before this time")
    p.add_argument(
        "--group-by",
        default="tenant",
        choices=("tenant", "model", "version", "day"),
        help="one row per (default tenant)",
    )
    p.add_argument("--tenant", default=None, help="only this tenant")
    p.add_argument(
        "--format", default="table", choices=("table", "csv", "json"), help="output (default table)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")


def fetch(args: argparse.Namespace) -> dict:
    from zeroserve.shared import env

    key = args.admin_key or env.admin_key()
    if not key:
        raise SystemExit(
            "zeroserve usage: give the server's admin key with --admin-key or ZEROSERVE_ADMIN_KEY"
        )
    query = {"group_by": args.group_by}
    for name in ("since", "until", "tenant"):
        if getattr(args, name):
            query[name] = getattr(args, name)
    url = args.url.rstrip("/") + "/admin/usage?" + urllib.parse.urlencode(query)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        hint = " (is the server started with --admin-key?)" if e.code == 404 else ""
        raise SystemExit(f"zeroserve usage: {args.url} answered {e.code}: {message}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"zeroserve usage: cannot reach {args.url}: {getattr(e, 'reason', e)}") from None


def render(result: dict, fmt: str) -> str:
    group = result["group_by"]
    rows = [[_cell(r.get(group)), *(str(r[c]) for c in COLUMNS)] for r in result["data"]]
    header = [group, *COLUMNS]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return out.getvalue()
    if fmt == "json":
        return json.dumps(result, indent=2) + "\n"
    if rows:
        totals = [sum(int(r[i + 1]) for r in rows) for i in range(len(COLUMNS))]
        rows.append(["TOTAL", *map(str, totals)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for r in rows:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        )
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(render(fetch(args), args.format))
    return 0
