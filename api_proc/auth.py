"""Bearer API keys, each belonging to a tenant, and the tenant's request and token limits.

Keys come from ``--api-key NAME:KEY`` (a plain ``KEY`` gets the tenant name ``key-`` + the first
8 hex digits of its SHA-256), ``ZEROSERVE_API_KEY`` (the same forms, comma-separated) and the
keys file ``--api-keys-file`` (docs/audit.md), which may also set per-tenant limits:

    [tenants.acme]
    keys = ["sk-acme-1", "sk-acme-2"]   # or key = "..."
    requests_per_minute = 600           # optional
    tokens_per_minute = 200000          # optional

The file must be readable by its owner alone (mode 0600 or stricter): it holds secrets. Only
SHA-256 digests of the keys are kept in memory, and a key is never logged or stored; the
tenant name is what the request context, the access log, metrics and the audit trail carry.

The middleware compares the digest of the presented key with every key's digest
(``hmac.compare_digest``, all of them, so the time says nothing about which matched), sets
``RequestContext.tenant``, and for a tenant with limits asks ``limits.TenantLimits`` before the
handler runs: over the limit is 429 with ``Retry-After``. /admin paths are not checked here
(admin.py has its own key).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field

from aiohttp import web

from zeroserve.api_proc.errors import ApiError
from zeroserve.api_proc.request_log import REQUEST_CTX

TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
ADMIN_PREFIX = "/admin"


class KeysError(ValueError):
    """A key, a keys file or a limit that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Tenant:
    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass
class Tenants:
    """Every key's digest and the tenant it belongs to, in one order (the comparison visits all)."""

    digests: list[bytes] = field(default_factory=list)
    owners: list[Tenant] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.digests)

    @property
    def names(self) -> list[str]:
        return sorted({t.name for t in self.owners})

    def by_name(self) -> dict[str, Tenant]:
        return {t.name: t for t in self.owners}

    def add(self, tenant: Tenant, key: str, source: str) -> None:
        if not key:
            raise KeysError(f"{source}: tenant {tenant.name!r} has an empty key")
        digest = digest_of(key)
        for d, owner in zip(self.digests, self.owners):
            if hmac.compare_digest(d, digest):
                if owner.name == tenant.name:
                    return  # the same key given twice for the same tenant (flag and env, say)
                raise KeysError(
                    f"{source}: one key is given to two tenants, {owner.name!r} and {tenant.name!r}"
                )
        known = self.by_name().get(tenant.name)
        if known is not None and known != tenant:
            raise KeysError(f"{source}: tenant {tenant.name!r} is defined twice with different limits")
        self.digests.append(digest)
        self.owners.append(tenant)

    def match(self, token: str) -> Tenant | None:
        """The tenant whose key is ``token``; constant time in the token's content and in which
        key matched (every digest is compared)."""
        candidate = digest_of(token)
        found = None
        for digest, owner in zip(self.digests, self.owners):
            if hmac.compare_digest(candidate, digest):
                found = owner
        return found


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def derived_name(key: str) -> str:
    """The tenant name of a key given without one: stable, and says nothing usable about the key."""
    return "key-" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def split_key(item: str) -> tuple[str, str]:
    """``NAME:KEY`` -> (NAME, KEY); a plain KEY (no colon, or what precedes the first colon is not
    a tenant name) -> (derived name, KEY). A key that itself holds a colon must be given as NAME:KEY."""
    name, sep, key = item.partition(":")
    if sep and TENANT_NAME.fullmatch(name) and key:
        return name, key
    return derived_name(item), item


def check_file_mode(path: str) -> None:
    """Refuse a keys file that group or others may read or write (it holds secrets)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise KeysError(f"--api-keys-file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeysError(f"--api-keys-file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeysError(
            f"--api-keys-file {path} is readable or writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); it holds API keys: chmod 600 {path}"
        )


def _limit(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KeysError(f"{what} must be a positive integer, got {value!r}")
    return value


def load_keys_file(path: str) -> list[tuple[Tenant, str]]:
    """(tenant, key) for every key in the file; TOML, or JSON of the same shape when the name
    ends in .json. Refuses a file others can read, unknown fields, bad names and bad limits."""
    check_file_mode(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        doc = json.loads(raw) if path.endswith(".json") else tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:  # TOMLDecodeError and JSONDecodeError too
        raise KeysError(f"--api-keys-file {path}: cannot read it: {e}") from None
    if not isinstance(doc, dict) or set(doc) - {"tenants"} or not isinstance(doc.get("tenants", {}), dict):
        raise KeysError(f"--api-keys-file {path}: expected a [tenants.NAME] table per tenant (docs/audit.md)")
    out = []
    for name, entry in doc.get("tenants", {}).items():
        where = f"--api-keys-file {path}: tenant {name!r}"
        if not TENANT_NAME.fullmatch(name):
            raise KeysError(f"{where}: a name is 1-64 letters, digits, '_', '.', '@' or '-'")
        if not isinstance(entry, dict):
            raise KeysError(f"{where}: expected a table with key or keys")
        unknown = set(entry) - {"key", "keys", "requests_per_minute", "tokens_per_minute"}
        if unknown:
            raise KeysError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        keys = entry.get("keys", [])
        if "key" in entry:
            keys = [entry["key"], *keys]
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise KeysError(f'{where}: give key = "..." or keys = ["...", ...] (non-empty strings)')
        tenant = Tenant(
            name,
            _limit(entry.get("requests_per_minute"), f"{where}: requests_per_minute"),
            _limit(entry.get("tokens_per_minute"), f"{where}: tokens_per_minute"),
        )
        out += [(tenant, k) for k in keys]
    return out


def build_tenants(api_keys: list[str], keys_file: str | None = None) -> Tenants:
    """The tenants of ``--api-key`` items (``NAME:KEY`` or ``KEY``) and of the keys file."""
    tenants = Tenants()
    for item in api_keys:
        name, key = split_key(item)
        tenants.add(Tenant(name), key, "--api-key")
    if keys_file:
        for tenant, key in load_keys_file(keys_file):
            tenants.add(tenant, key, f"--api-keys-file {keys_file}")
    return tenants


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def auth_middleware(tenants: Tenants, exempt_paths: list[str], limits=None):
    """``limits``: a limits.TenantLimits (checked before the handler, corrected after it) or None."""
    exempt = frozenset(exempt_paths)

    @web.middleware
    async def require_api_key(request: web.Request, handler):
        path = request.path
        if not tenants or path in exempt or path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            return await handler(request)
        token = bearer_token(request)
        tenant = tenants.match(token) if token is not None else None
        if tenant is None:
            raise ApiError(
                401,
                "Missing or invalid API key: send it as the header `Authorization: Bearer <key>`.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        ctx = request.get(REQUEST_CTX)
        if ctx is not None:
            ctx.tenant = tenant.name
        if limits is None or not limits.applies(tenant, request):
            return await handler(request)
        charge = await limits.admit(tenant, request)
        try:
            return await handler(request)
        finally:
            limits.settle(tenant, charge, ctx)

    return require_api_key


def tenants_of(config):
    """An ApiConfig's tenants and their limits (None when no tenant has one); a keys file that
    cannot be used stops the process with the reason."""
    from zeroserve.api_proc.limits import TenantLimits

    try:
        tenants = build_tenants(config.api_keys, config.api_keys_file)
    except KeysError as e:
        raise SystemExit(f"zeroserve api: {e}") from None
    limits = TenantLimits(tenants.owners, 1.0 / max(1, config.api_workers), config.max_body_bytes)
    return tenants, (limits or None)
