"""Two real ssh "hosts" on one Linux box: network namespaces on a bridge, each with its own sshd.

Used by ``test_multinode.py`` to drive the stock ``deepspeed --hostfile`` runner (pdsh over ssh)
across two machines without a cluster.  The recipe (verified in the project's design notes):

* bridge ``lagbr0`` = 10.77.0.254/24 in the root namespace;
* namespaces ``lagn1``/``lagn2``, each joined to the bridge by a veth pair whose inner end is
  renamed ``eth0`` and given 10.77.0.1/24 resp. 10.77.0.2/24; ``lo`` and ``eth0`` up;
* one ``sshd`` per namespace, listening only on that namespace's address, with a dedicated host
  key, authorized-keys file and config kept in :data:`STATE_DIR` (nothing under ``/etc/ssh`` is
  touched); root logs in with the dedicated key :data:`CLIENT_KEY`;
* the ssh *client* must find that key for the DeepSpeed runner's own ``ssh``/``pdsh`` calls, which
  take no options, so a marked ``Host 10.77.0.*`` block is put at the top of ``~/.ssh/config``
  (at the top so that no earlier ``Host *`` entry overrides it; it ends with ``Host *`` so that
  top-level lines of the user's file stay global) and removed again on teardown.

Only the addresses of these namespaces are ever used.  Filesystems are shared between namespaces,
so the venv and run directories are visible on both "hosts".  Processes inside a namespace
see ``eth0`` = the veth, so gloo must be told ``GLOO_SOCKET_IFNAME=eth0``.

Set-up first removes leftovers of a crashed earlier run (under an exclusive lock, so never those of
a concurrent one); teardown kills every process left in the namespaces, deletes them and the
bridge, and restores ``~/.ssh/config``.  Both are idempotent.

Example::

    >>> with two_hosts() as hosts:                      # doctest: +SKIP
    ...     print(hosts.hostfile_text())
    10.77.0.1 slots=1
    10.77.0.2 slots=1
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BRIDGE = "lagbr0"
BRIDGE_ADDR = "10.77.0.254"
PREFIX_LEN = 24
NAMESPACES = ("lagn1", "lagn2")
ADDRESSES = ("10.77.0.1", "10.77.0.2")
HOST_PATTERN = "10.77.0.*"
IFNAME = "eth0"
"""Name of the network interface inside each namespace (for ``GLOO_SOCKET_IFNAME``)."""

STATE_DIR = Path("/run/lag_ds_netns")
LOCK_PATH = Path("/run/lag_ds_netns.lock")
CLIENT_KEY = Path.home() / ".ssh" / "lag_ds_test_ed25519"
SSH_CONFIG = Path.home() / ".ssh" / "config"
MARK_BEGIN = "# >>> lag_ds test hosts (tests/netns_hosts.py; removed on teardown) >>>"
MARK_END = "# <<< lag_ds test hosts <<<"
REQUIRED_TOOLS = {"ip": "iproute2", "sshd": "openssh-server", "ssh": "openssh-client",
                  "ssh-keygen": "openssh-client", "pdsh": "pdsh"}
TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


class Unavailable(RuntimeError):
    """The box cannot host the namespaces (not root, tools missing, no permission): skip."""


@dataclass(frozen=True)
class Hosts:
    """The running hosts: ``namespaces[i]`` answers ssh on ``addresses[i]``."""

    namespaces: tuple[str, ...]
    addresses: tuple[str, ...]

    def hostfile_text(self, slots: int = 1) -> str:
        return "".join(f"{a} slots={slots}\n" for a in self.addresses)

    def exec_prefix(self, index: int) -> list[str]:
        """argv prefix running a command inside host ``index``'s namespace."""
        return [tool("ip"), "netns", "exec", self.namespaces[index]]


def tool(name: str) -> str:
    """Absolute path of a required tool (sbin dirs included: PATH may lack them)."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(TOOL_DIRS))
    if found is None:
        raise Unavailable(f"{name} not found (apt-get install {REQUIRED_TOOLS.get(name, name)}; "
                          ".ci/run installs it)")
    return found


def _run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(tool("ip"), *args, check=check)


def check_prerequisites() -> None:
    """Raise :class:`Unavailable` with the reason when this box cannot run the hosts."""
    if not sys.platform.startswith("linux"):
        raise Unavailable(f"network namespaces need Linux, this is {sys.platform}")
    if os.geteuid() != 0:
        raise Unavailable("network namespaces and sshd need root")
    for name in REQUIRED_TOOLS:
        tool(name)


# ---- ~/.ssh/config block ----------------------------------------------------------------------

def _strip_block(text: str) -> str:
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == MARK_BEGIN:
            inside = True
        elif inside and line.rstrip("\n") == MARK_END:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


def _client_block() -> str:
    return "\n".join([
        MARK_BEGIN,
        f"Host {HOST_PATTERN}",
        "    User root",
        f"    IdentityFile {CLIENT_KEY}",
        "    IdentitiesOnly yes",
        "    StrictHostKeyChecking no",
        "    UserKnownHostsFile /dev/null",
        "    BatchMode yes",
        "    ConnectTimeout 10",
        "    LogLevel ERROR",
        "Host *",
        MARK_END,
    ]) + "\n"


def _write_ssh_config(text: str) -> None:
    tmp = SSH_CONFIG.with_name(SSH_CONFIG.name + ".lag_ds.tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    os.replace(tmp, SSH_CONFIG)


def _install_client_config() -> None:
    SSH_CONFIG.parent.mkdir(mode=0o700, exist_ok=True)
    if not CLIENT_KEY.exists():
        CLIENT_KEY.with_name(CLIENT_KEY.name + ".pub").unlink(missing_ok=True)
        _run(tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "lag_ds test hosts",
             "-f", str(CLIENT_KEY))
    old = SSH_CONFIG.read_text() if SSH_CONFIG.exists() else ""
    _write_ssh_config(_client_block() + _strip_block(old))


def _remove_client_config() -> None:
    if not SSH_CONFIG.exists():
        return
    old = SSH_CONFIG.read_text()
    if MARK_BEGIN not in old:
        return
    new = _strip_block(old)
    if new.strip():
        _write_ssh_config(new)
    else:
        SSH_CONFIG.unlink()


# ---- namespaces, bridge, sshd -----------------------------------------------------------------

def _veth(i: int) -> str:
    return f"lagv{i + 1}"


def _sshd_pid_file(ns: str) -> Path:
    return STATE_DIR / f"sshd-{ns}.pid"


def _kill_and_wait(pids: list[int], timeout_s: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            if not pids:
                return
            time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def _existing_namespaces() -> set[str]:
    proc = _ip("netns", "list", check=False)
    return {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}


def _link_exists(name: str) -> bool:
    return _ip("link", "show", "dev", name, check=False).returncode == 0


def teardown() -> None:
    """Remove everything :func:`setup` creates; fine to call when some or all of it is absent."""
    if os.geteuid() != 0:
        return
    try:
        ip_ok = tool("ip")
    except Unavailable:
        ip_ok = None
    for ns in NAMESPACES:
        pids: list[int] = []
        pid_file = _sshd_pid_file(ns)
        if pid_file.exists():
            text = pid_file.read_text().strip()
            if text.isdigit():
                pids.append(int(text))
        if ip_ok and ns in _existing_namespaces():
            # Every process still inside our namespace is ours: sshd, its sessions, stray ranks.
            proc = _ip("netns", "pids", ns, check=False)
            pids += [int(p) for p in proc.stdout.split() if p.isdigit()]
        _kill_and_wait(sorted(set(pids)))
        if ip_ok and ns in _existing_namespaces():
            _ip("netns", "del", ns)
    if ip_ok:
        for i in range(len(NAMESPACES)):
            if _link_exists(_veth(i)):
                _ip("link", "del", _veth(i))
        if _link_exists(BRIDGE):
            _ip("link", "del", BRIDGE)
    _remove_client_config()
    shutil.rmtree(STATE_DIR, ignore_errors=True)


def _write_sshd_files() -> Path:
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    STATE_DIR.chmod(0o700)  # sshd's StrictModes checks the authorized-keys file's directories
    host_key = STATE_DIR / "ssh_host_ed25519_key"
    _run(tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "lag_ds test host",
         "-f", str(host_key))
    authorized = STATE_DIR / "authorized_keys"
    authorized.write_text(CLIENT_KEY.with_name(CLIENT_KEY.name + ".pub").read_text())
    authorized.chmod(0o600)
    config = STATE_DIR / "sshd_config"
    config.write_text("\n".join([
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",  # PAM's loginuid/session modules fail in containers; keys need no PAM
        "UseDNS no",
        "X11Forwarding no",
        "PrintMotd no",
        "MaxStartups 100",
        "LogLevel ERROR",
    ]) + "\n")
    # sshd's privilege-separation directory is compiled in; a fresh box may lack it.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    return config


def _wait_for_ssh(prefix: list[str], address: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        proc = _run(*prefix, tool("ssh"), address, "echo", "lag-ok", check=False)
        if proc.returncode == 0 and proc.stdout.strip() == "lag-ok":
            return
        if time.monotonic() > deadline:
            where = f" from {prefix[-1]}" if prefix else ""
            raise RuntimeError(f"ssh to {address}{where} does not work: "
                               f"{(proc.stderr or proc.stdout).strip()}")
        time.sleep(0.2)


def setup() -> Hosts:
    """Create bridge, namespaces and sshds (see the module docstring); returns the hosts.

    Raises :class:`Unavailable` if namespaces cannot be made here; any other failure is an error.
    The caller runs :func:`teardown` whatever happens (see :func:`two_hosts`).
    """
    check_prerequisites()
    ip_bin = tool("ip")
    first = _ip("netns", "add", NAMESPACES[0], check=False)
    if first.returncode != 0:
        raise Unavailable(f"cannot create a network namespace (ip netns add: "
                          f"{first.stderr.strip()})")
    clash = _ip("-4", "route", "show", "to", "match", ADDRESSES[0], check=False).stdout
    if "10.77.0." in clash:
        raise RuntimeError(f"10.77.0.0/24 is already routed on this box ({clash.strip()}); "
                           "the test hosts need that subnet to themselves")
    _ip("link", "add", BRIDGE, "type", "bridge")
    # Bridged frames must not meet the host's iptables FORWARD rules (br_netfilter): best effort.
    _ip("link", "set", BRIDGE, "type", "bridge", "nf_call_iptables", "0", check=False)
    _ip("addr", "add", f"{BRIDGE_ADDR}/{PREFIX_LEN}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for i, (ns, address) in enumerate(zip(NAMESPACES, ADDRESSES)):
        if i:
            _ip("netns", "add", ns)
        outer, inner = _veth(i), f"{_veth(i)}p"
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", outer, "master", BRIDGE)
        _ip("link", "set", outer, "up")
        _ip("-n", ns, "link", "set", inner, "name", IFNAME)
        _ip("-n", ns, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", IFNAME)
        _ip("-n", ns, "link", "set", IFNAME, "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    _install_client_config()
    sshd_config = _write_sshd_files()
    for ns, address in zip(NAMESPACES, ADDRESSES):
        _run(ip_bin, "netns", "exec", ns, tool("sshd"), "-f", str(sshd_config),
             "-o", f"ListenAddress={address}", "-o", f"PidFile={_sshd_pid_file(ns)}",
             "-E", str(STATE_DIR / f"sshd-{ns}.log"))
    hosts = Hosts(namespaces=NAMESPACES, addresses=ADDRESSES)
    for i in range(len(NAMESPACES)):
        for address in ADDRESSES:  # every host reaches every host, through the bridge
            _wait_for_ssh(hosts.exec_prefix(i), address)
    for address in ADDRESSES:  # and the root namespace reaches them too
        _wait_for_ssh([], address)
    return hosts


@contextmanager
def _exclusive_lock(timeout_s: float = 600.0) -> Iterator[None]:
    """One user of the (fixed-name) namespaces at a time, across processes."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{LOCK_PATH} held by another run for {timeout_s:g}s")
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)


@contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Set the hosts up (after clearing leftovers), yield them, always tear them down."""
    check_prerequisites()
    with _exclusive_lock():
        teardown()  # leftovers of a crashed run: the lock says nobody else is using them
        atexit.register(teardown)  # in case the interpreter exits without unwinding
        try:
            yield setup()
        finally:
            atexit.unregister(teardown)
            teardown()
