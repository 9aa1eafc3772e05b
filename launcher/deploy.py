"""`zeroserve deploy supervisord|systemd --out DIR [serve flags]`: production launch files.

Both render one shared engine config (zeroserve.json) and one program/unit per process,
each running ``zeroserve proc ROLE --config FILE --index N``: the same commands
`zeroserve serve` uses. Secrets (API keys) go in an environment file, never in the config.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import msgspec

from zeroserve.shared.config import EngineConfig, write_config
from zeroserve.shared.ipc import client_keys

# (role, start priority); workers load weights first, the api comes up last
ROLE_ORDER = (("worker", 10), ("scheduler", 20), ("tokenizer", 30), ("api", 40))


def add_parser(sub) -> None:
    from zeroserve.launcher.engine_args import add_engine_args

    p = sub.add_parser(
        "deploy",
        help="render supervisord or systemd files for a production launch",
        description="Render a supervisord config or systemd units that run each zeroserve process on its own.",
    )
    p.add_argument("kind", choices=["supervisord", "systemd"])
    p.add_argument("--out", required=True, help="directory to write the files into")
    p.add_argument("--user", default="zeroserve", help="systemd: the dedicated user the units run as")
    p.add_argument(
        "--config-dir",
        default="/etc/zeroserve",
        help="systemd: where the config and env file will be installed",
    )
    add_engine_args(p)


def executable() -> str:
    script = os.path.join(os.path.dirname(sys.executable), "zeroserve")
    return script if os.path.exists(script) else f"{sys.executable} -m zeroserve.launcher.cli"


def role_instances(config: EngineConfig) -> list[tuple[str, int, int]]:
    # tensor parallel: worker i is rank i; a broken group's ranks all exit, and each is restarted
    counts = {
        "worker": config.tensor_parallel_size,
        "scheduler": 1,
        "tokenizer": config.num_tokenizers,
        "api": config.api_workers,
    }
    return [(role, i, prio) for role, prio in ROLE_ORDER for i in range(counts[role])]


def _write(path: str, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def env_file_text(api_keys: list[str]) -> str:
    lines = ["# zeroserve secrets: read by every process (systemd EnvironmentFile / supervisord environment)"]
    lines.append(f"ZEROSERVE_API_KEY={','.join(api_keys)}" if api_keys else "# ZEROSERVE_API_KEY=key1,key2")
    return "\n".join(lines) + "\n"


def write_api_config(config: EngineConfig, path: str) -> None:
    """The api processes' config: the same, but with client CURVE keys only (an api process
    only connects; it never needs the server secret)."""
    write_config(msgspec.structs.replace(config, curve=client_keys(config.curve)), path)


def render_supervisord(config: EngineConfig, out: str, api_keys: list[str]) -> list[str]:
    config_path = os.path.join(out, "zeroserve.json")
    api_config_path = os.path.join(out, "zeroserve-api.json")
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    write_config(config, config_path)
    write_api_config(config, api_config_path)
    env = {
        "OMP_WAIT_POLICY": "PASSIVE",
        "PROMETHEUS_MULTIPROC_DIR": config.metrics_dir,
        "PYTHONUNBUFFERED": "1",
    }
    if api_keys:
        env["ZEROSERVE_API_KEY"] = ",".join(api_keys)
    environment = ",".join(f'{k}="{v}"' for k, v in env.items())
    parts = [
        "; rendered by `zeroserve deploy supervisord`; start with: supervisord -c "
        + os.path.join(out, "supervisord.conf"),
        "[supervisord]",
        f"logfile={os.path.join(logs, 'supervisord.log')}",
        f"pidfile={os.path.join(out, 'supervisord.pid')}",
        "nodaemon=false",
        "",
        "[unix_http_server]",
        f"file={os.path.join(out, 'supervisor.sock')}",
        "chmod=0700",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{os.path.join(out, 'supervisor.sock')}",
        "",
    ]
    names = []
    for role, index, priority in role_instances(config):
        name = role if index == 0 else f"{role}-{index}"
        names.append(name)
        parts += [
            f"[program:{name}]",
            f"command={executable()} proc {role} "
            f"--config {shlex.quote(api_config_path if role == 'api' else config_path)} --index {index}",
            f"priority={priority}",
            "autostart=true",
            "autorestart=true",
            "startsecs=1",
            "startretries=10",
            "stopsignal=TERM",
            f"stopwaitsecs={130 if role in ('api', 'tokenizer') else 15}",
            "stopasgroup=true",
            "killasgroup=true",
            f'environment={environment},ZEROSERVE_NO_PDEATHSIG="1"',
            f"stdout_logfile={os.path.join(logs, name + '.log')}",
            "redirect_stderr=true",
            "",
        ]
    parts += ["[group:zeroserve]", f"programs={','.join(names)}", ""]
    conf = os.path.join(out, "supervisord.conf")
    _write(conf, "\n".join(parts), 0o600)
    return [conf, config_path, api_config_path]


def render_systemd(
    config: EngineConfig, out: str, api_keys: list[str], user: str, config_dir: str
) -> list[str]:
    installed_config = os.path.join(config_dir, "zeroserve.json")
    installed_api_config = os.path.join(config_dir, "zeroserve-api.json")
    env_path = os.path.join(config_dir, "zeroserve.env")
    write_config(config, os.path.join(out, "zeroserve.json"))
    write_api_config(config, os.path.join(out, "zeroserve-api.json"))
    _write(os.path.join(out, "zeroserve.env"), env_file_text(api_keys), 0o600)
    files = [os.path.join(out, f) for f in ("zeroserve.json", "zeroserve-api.json", "zeroserve.env")]
    units = []
    for role, index, _ in role_instances(config):
        unit = f"zeroserve-{role}-{index}.service"
        units.append(unit)
        after = {
            "worker": "network-online.target",
            "scheduler": "zeroserve-worker-0.service",
            "tokenizer": "zeroserve-scheduler-0.service",
            "api": "zeroserve-tokenizer-0.service",
        }[role]
        # the worker compiles the C++ CPU kernels once and caches them: a writable cache
        # directory under ProtectSystem=strict (the service user has no home)
        cache = (
            "CacheDirectory=zeroserve\nEnvironment=ZEROSERVE_CACHE_DIR=/var/cache/zeroserve\n"
            if role == "worker"
            else ""
        )
        text = f"""# rendered by `zeroserve deploy systemd`
[Unit]
Description=zeroserve {role} #{index} ({config.served_model_name})
PartOf=zeroserve.target
After={after}
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
ExecStart={executable()} proc {role} --config {installed_api_config if role == "api" else installed_config} --index {index}
EnvironmentFile=-{env_path}
Environment=OMP_WAIT_POLICY=PASSIVE
Environment=PYTHONUNBUFFERED=1
Environment=ZEROSERVE_NO_PDEATHSIG=1
Environment=PROMETHEUS_MULTIPROC_DIR={config.metrics_dir}
{cache}RuntimeDirectory={os.path.basename(config.run_dir)}
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
Restart=always
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec={130 if role in ("api", "tokenizer") else 15}
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=read-only
ProtectKernelTunables=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
ReadWritePaths={config.run_dir}

[Install]
WantedBy=zeroserve.target
"""
        path = os.path.join(out, unit)
        _write(path, text)
        files.append(path)
    target = f"""# rendered by `zeroserve deploy systemd`
[Unit]
Description=zeroserve: {config.served_model_name} on {config.host}:{config.port}
Wants={" ".join(units)}
After=network-online.target

[Install]
WantedBy=multi-user.target
"""
    _write(os.path.join(out, "zeroserve.target"), target)
    files.append(os.path.join(out, "zeroserve.target"))
    readme = f"""Install (as root):
  useradd --system --no-create-home --shell /usr/sbin/nologin {user}
  install -d -m 0750 -o root -g {user} {config_dir}
  install -m 0640 -o root -g {user} zeroserve.json {installed_config}
  install -m 0640 -o root -g {user} zeroserve-api.json {installed_api_config}
  install -m 0640 -o root -g {user} zeroserve.env {env_path}   # put ZEROSERVE_API_KEY here
  cp zeroserve*.service zeroserve.target /etc/systemd/system/ && systemctl daemon-reload
  systemctl enable --now zeroserve.target
"""
    _write(os.path.join(out, "INSTALL.txt"), readme)
    return files


def run(args: argparse.Namespace) -> int:
    from zeroserve.launcher.engine_args import config_from_args

    if args.data_parallel_size != 1:  # the files below hold one scheduler and one worker
        raise SystemExit(
            "zeroserve deploy: --data-parallel-size is not supported here yet (it renders one replica); "
            "run `zeroserve serve --data-parallel-size N` under your service manager instead"
        )
    if getattr(args, "models_file", None):  # no launcher, no registry: one model per set of units
        raise SystemExit(
            "zeroserve deploy: --models needs the launcher (it runs the model registry, its engine groups "
            "and the canary controller); run `zeroserve serve --models FILE` under your service manager "
            "instead, or deploy one model (MODEL) per set of units"
        )
    if args.distributed_executor_backend != "mp":  # the service manager runs these processes, not Ray
        raise SystemExit(
            "zeroserve deploy: --distributed-executor-backend ray is for `zeroserve serve`, which places "
            "the replicas on the Ray cluster; run that under your service manager instead"
        )
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    api_keys = list(args.api_keys)
    args.api_keys = []  # keys go to the environment, not the config file
    if args.kind == "systemd":
        run_dir = args.run_dir or "/run/zeroserve"
    else:
        run_dir = args.run_dir or os.path.join(out, "run")
    config = config_from_args(args, run_dir=run_dir)
    if args.kind == "supervisord":
        os.makedirs(config.metrics_dir, mode=0o700, exist_ok=True)
        files = render_supervisord(config, out, api_keys)
    else:
        files = render_systemd(config, out, api_keys, args.user, args.config_dir)
    for f in files:
        print(f)
    return 0
