"""The run directory of `zeroserve serve` and `zeroserve batch`: sockets, config files, metrics.

``--run-dir DIR`` is used as given, so clients find ``DIR/tokenizer-0.sock``; without it a
new private temporary directory is made. zeroserve removes only what it made:

    DIR/                      created (mode 0700, with any missing parents) unless it exists;
                              removed at exit only if this run created it and it is empty
      config.json             the engine config (mode 0600)
      api-config.json         the same for api processes, without the CURVE server secret
      metrics/                prometheus multiprocess files (*.db); removed if made by this run
      tokenizer-0.sock ...    ipc sockets (removed if still there); with replicas also
                              scheduler-R.sock, workers-R.sock, replay-R.sock, registry-*.sock

An existing DIR must be a directory of the current user that group and others cannot write
(they could swap the sockets). A name zeroserve uses that holds something zeroserve did not
leave there (a config.json that is not an engine config, a .sock that is not a socket, a
metrics/ with other files) is refused rather than overwritten.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import msgspec

from zeroserve.shared.config import EngineConfig, write_config
from zeroserve.shared.ipc import client_keys, make_run_dir

CONFIG_NAME = "config.json"
API_CONFIG_NAME = "api-config.json"


class RunDirError(SystemExit):
    """A run directory zeroserve will not use; the message says why and what to do."""


def _check_private(path: str, flag: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise RunDirError(f"zeroserve: {flag} {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"zeroserve: {flag} {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise RunDirError(
            f"zeroserve: {flag} {path} belongs to another user (uid {st.st_uid}); use a directory of your own"
        )
    if st.st_mode & 0o022:
        raise RunDirError(
            f"zeroserve: {flag} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}), "
            f"who could replace zeroserve's sockets there; use a directory only you can write "
            f"(chmod go-w {path}), or leave out --run-dir for a private temporary one"
        )


def _make_dirs(path: str) -> list[str]:
    """Create path and its missing parents, each mode 0700; returns them, outermost first."""
    missing = []
    head = path
    while not os.path.lexists(head):
        missing.append(head)
        head = os.path.dirname(head)
    made = []
    try:
        for d in reversed(missing):
            os.mkdir(d, 0o700)
            made.append(d)
            os.chmod(d, 0o700)  # mkdir's mode passes through the umask
    except OSError as e:
        for d in reversed(made):
            _rmdir_if_empty(d)
        raise RunDirError(f"zeroserve: cannot create the run directory {path}: {e.strerror}") from None
    return made


@dataclass
class RunDir:
    path: str
    made_dirs: list[str] = field(default_factory=list)  # outermost first
    made_metrics: bool = False

    @classmethod
    def claim(cls, path: str | None, flag: str = "--run-dir") -> RunDir:
        """The directory to run in: ``path`` (checked, created if missing) or a new temporary one."""
        if path is None:
            fresh = make_run_dir()
            return cls(fresh, [fresh])
        path = os.path.abspath(path)
        made = _make_dirs(path)
        _check_private(path, flag)
        return cls(path, made)

    def sockets(self, config: EngineConfig) -> list[str]:
        if config.transport != "ipc":
            return []
        addresses = list(config.tokenizer_addresses)
        for r in range(config.data_parallel_size):
            addresses += [config.scheduler_address_of(r), config.worker_address_of(r)]
            if config.tensor_parallel_size > 1:
                addresses += [config.tp_group_address_of(r), config.tp_heartbeat_address_of(r)]
        if config.uses_registry:
            addresses += [config.replay_address_of(r) for r in range(config.data_parallel_size)]
            addresses += [config.registry_publish_address, config.registry_subscribe_address]
        if config.control_address is not None:  # the model registry's control channel
            addresses.append(config.control_address)
        addresses = [a for a in addresses if a.startswith("ipc://")]  # a registry_address may be tcp
        return [a[len("ipc://") :] for a in addresses]

    def prepare(self, config: EngineConfig) -> tuple[str, str]:
        """Refuse foreign files under zeroserve's names, clear stale metrics, write both configs.

        Returns the paths of the engine config and of the api processes' config."""
        foreign = []
        for name in (CONFIG_NAME, API_CONFIG_NAME):
            p = os.path.join(self.path, name)
            if os.path.lexists(p) and not _is_engine_config(p):
                foreign.append(p)
        for p in self.sockets(config):
            if os.path.lexists(p) and not stat.S_ISSOCK(os.lstat(p).st_mode):
                foreign.append(p)
        metrics = config.metrics_dir
        if os.path.lexists(metrics):
            if not os.path.isdir(metrics) or os.path.islink(metrics):
                foreign.append(metrics)
            else:
                foreign += [os.path.join(metrics, f) for f in os.listdir(metrics) if not f.endswith(".db")]
        if foreign:
            raise RunDirError(
                f"zeroserve: the run directory {self.path} holds files zeroserve did not make under "
                f"names it uses: {', '.join(sorted(foreign))}; move them, or choose another --run-dir"
            )
        if os.path.isdir(metrics):
            for f in os.listdir(metrics):  # stale multiprocess metrics of a run that crashed
                os.unlink(os.path.join(metrics, f))
        else:
            os.mkdir(metrics, 0o700)
            self.made_metrics = True
        engine_path = os.path.join(self.path, CONFIG_NAME)
        api_path = os.path.join(self.path, API_CONFIG_NAME)
        write_config(config, engine_path)
        write_config(msgspec.structs.replace(config, curve=client_keys(config.curve)), api_path)
        return engine_path, api_path

    def clean(self, config: EngineConfig) -> None:
        """Remove what zeroserve made; anything else in the directory stays, and so does it then."""
        for name in (CONFIG_NAME, API_CONFIG_NAME):
            _unlink_if(os.path.join(self.path, name), stat.S_ISREG)
        for p in self.sockets(config):
            _unlink_if(p, stat.S_ISSOCK)
        # the model registry's per-version dirs (launcher/engine_groups.py), each removed by its group
        _rmdir_if_empty(os.path.join(self.path, "groups"))
        metrics = config.metrics_dir
        if os.path.isdir(metrics) and not os.path.islink(metrics):
            for f in os.listdir(metrics):
                if f.endswith(".db"):
                    _unlink_if(os.path.join(metrics, f), stat.S_ISREG)
            if self.made_metrics:
                _rmdir_if_empty(metrics)
        self.release()

    def release(self) -> None:
        """Remove the directories this run created, where they are empty."""
        for d in reversed(self.made_dirs):
            _rmdir_if_empty(d)


def _is_engine_config(path: str) -> bool:
    """A regular file holding a JSON object with the engine config's key fields (of any version)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        with open(path, "rb") as f:
            obj = msgspec.json.decode(f.read(1 << 20))
    except (OSError, msgspec.DecodeError, RecursionError):
        return False
    return isinstance(obj, dict) and {"model", "served_model_name", "run_dir"} <= obj.keys()


def _unlink_if(path: str, is_kind) -> None:
    try:
        if is_kind(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty: someone else's files are in it
