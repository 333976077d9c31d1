"""Start and stop the two servers under test, both on 127.0.0.1.

- OpenSSH: ``sshd -D -e -f <tmp>/sshd/sshd_config`` on a free port, its own
  ed25519 host key, ``AuthorizedKeysFile <tmp>/authorized_keys``.  Not a
  system service: nothing outside the temporary directory is used except the
  privilege-separation directory ``/run/sshd`` that sshd insists on.
- The agent: installed in a venv of its own (:mod:`benchmarks.install`),
  ``twistd -n --pidfile= coder-agent --ssh-endpoint=tcp:PORT:...`` started
  from ``/``, not from its sessions' ``$HOME``, with the options of the peer
  harness (:data:`AGENT_QUIET`).

Both are logged into as the same user.  As root that is a dedicated user
(``coderbench`` by default, created with ``useradd -m -s /bin/bash``), because
root's own dotfiles may be slow (here root's ``~/.bashrc`` runs ``pyenv init``,
and bash reads ``~/.bashrc`` whenever ``SSH_CLIENT`` is set): exec latency
would time the dotfiles, not the servers.  The agent serves sessions as its
own user, so it is started as that user too (``setpriv``), with that user's
home as ``$HOME``.  When the Python that runs the agent cannot be executed by
that user (an interpreter under root's 0700 home, as pyenv installs it), the
agent runs as the invoking user with ``$HOME`` set to a temporary directory
holding copies of the bench user's dotfiles, so the shell reads the same files
under both servers; the report says which of the two happened.

Every process is a :class:`Proc`, stopped by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
INSTALL_HINT = (
    "OpenSSH's server is needed for the comparison: "
    "apt-get install openssh-server (as root; no service needs to run), "
    "or rerun with --install"
)
START_TIMEOUT = 60.0
STD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BenchSetupError(RuntimeError):
    """Something the benchmark needs is missing; the message says what to do."""


class Proc:
    """A child process that is always stopped by its own PID."""

    def __init__(self, args: list[str], **kwargs: object) -> None:
        self.args = args
        self.popen: subprocess.Popen[bytes] = subprocess.Popen(args, **kwargs)  # type: ignore[call-overload]
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        return self.popen.returncode


def freePort() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def waitBanner(port: int, proc: Proc, timeout: float) -> bool:
    """Wait until ``port`` answers with an SSH identification string."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(3)
                if s.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ----------------------------------------------------------------- the user --


@dataclass(frozen=True)
class BenchUser:
    """The account both servers log the client in as."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str

    @classmethod
    def fromPasswd(cls, entry: pwd.struct_passwd) -> BenchUser:
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell)


def ensureBenchUser(name: str) -> BenchUser:
    """As root: the user ``name`` (created if missing, never locked).

    Not root: the current user, since only root can log in as someone else.
    """
    if os.geteuid() != 0:
        return BenchUser.fromPasswd(pwd.getpwuid(os.geteuid()))
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, capture_output=True)
        print(f"[bench] created user {name} (useradd -m -s /bin/bash)", file=sys.stderr)
        entry = pwd.getpwnam(name)
    # sshd without PAM refuses an account whose password is locked ("!", as
    # useradd leaves it); "*" means "no password" without locking.
    if _passwordLocked(name):
        subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
    return BenchUser.fromPasswd(entry)


def _passwordLocked(name: str) -> bool:
    try:
        with open("/etc/shadow") as f:
            for line in f:
                parts = line.split(":")
                if parts[0] == name and len(parts) > 1:
                    return parts[1].startswith("!")
    except OSError:
        pass
    return False


# -------------------------------------------------------------------- files --


@dataclass(frozen=True)
class Keys:
    client: Path
    hostKey: Path
    authorizedKeys: Path


def makeKeys(workdir: Path) -> Keys:
    """A client key, an sshd host key, and an authorized_keys readable by the user."""

    def keygen(path: Path, comment: str) -> None:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            capture_output=True,
        )

    client = workdir / "client_ed25519"
    host = workdir / "sshd" / "host_ed25519"
    host.parent.mkdir(mode=0o700)
    keygen(client, "coderagent-bench-client")
    keygen(host, "coderagent-bench-sshd-host")
    authorized = workdir / "authorized_keys"
    authorized.write_text(Path(f"{client}.pub").read_text())
    authorized.chmod(0o644)
    return Keys(client, host, authorized)


def findSshd() -> str:
    if os.access(SSHD, os.X_OK):
        return SSHD
    raise BenchSetupError(f"{SSHD} not found. {INSTALL_HINT}")


def installOpenSSHServer() -> None:
    """``apt-get install openssh-server`` without starting a system sshd."""
    if os.geteuid() != 0:
        raise BenchSetupError("--install needs root. " + INSTALL_HINT)
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if ours:  # exit 101 = "do not start services" for the package's postinst
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "openssh-server", "openssh-client"],
            check=True,
            env=env,
            timeout=900,
        )
    finally:
        if ours:
            policy.unlink(missing_ok=True)


def versionOf(args: list[str]) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (r.stderr or r.stdout).strip().splitlines()
    return out[0] if out else "?"


# ------------------------------------------------------------------ servers --


@dataclass
class Server:
    name: str
    proc: Proc
    port: int
    login: str  # user name the client logs in as
    log: Path
    notes: dict[str, str] = field(default_factory=dict)
    profile: Path | None = None  # cProfile stats, written when the server stops

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int | None:
        return self.proc.stop()


SSHD_CONFIG = """\
# Written by coderagent's benchmarks/servers.py; not a system configuration.
ListenAddress 127.0.0.1:{port}
HostKey {hostKey}
PidFile none
AuthorizedKeysFile {authorizedKeys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
AllowUsers {user}
# the temporary directory lives under /tmp (mode 1777), which StrictModes rejects
StrictModes no
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
StreamLocalBindUnlink yes
GatewayPorts no
X11Forwarding no
PermitTTY yes
PrintMotd no
PrintLastLog no
UseDNS no
MaxStartups 200:30:400
MaxSessions 200
LogLevel ERROR
"""


def startSshd(workdir: Path, keys: Keys, user: BenchUser, attempts: int = 3) -> Server:
    """Start sshd on a free 127.0.0.1 port (retried if the port was taken meanwhile)."""
    sshd = findSshd()
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation
    config = workdir / "sshd" / "sshd_config"
    log = workdir / "sshd.log"
    for _ in range(attempts):
        port = freePort()
        config.write_text(
            SSHD_CONFIG.format(
                port=port,
                hostKey=keys.hostKey,
                authorizedKeys=keys.authorizedKeys,
                user=user.name,
            )
        )
        config.chmod(0o600)
        check = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise BenchSetupError(f"sshd rejected its configuration: {check.stderr.strip()}")
        with open(log, "ab") as out:
            proc = Proc(
                [sshd, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        if waitBanner(port, proc, START_TIMEOUT):
            return Server(
                "sshd",
                proc,
                port,
                user.name,
                log,
                {
                    "version": versionOf([sshd, "-V"]),
                    "runs as": f"root, sessions as {user.name}" if os.geteuid() == 0 else user.name,
                },
            )
        proc.stop()
    raise BenchSetupError(f"sshd did not start; its log ({log}):\n{tail(log)}")


#: twistd under cProfile.  twistd ends a signalled run by killing itself with
#: the same signal (``app._exitWithSignal``), which would skip ``python -m
#: cProfile``'s dump; this dumps first.  argv[1] is the output file.
PROFILED_TWISTD = """\
import cProfile, sys
from twisted.application import app
from twisted.scripts.twistd import run
out = sys.argv.pop(1)
sys.argv[0] = "twistd"
prof = cProfile.Profile()
exitWithSignal = app._exitWithSignal
def dumpThenExit(sig):
    prof.disable()
    prof.dump_stats(out)
    exitWithSignal(sig)
app._exitWithSignal = dumpThenExit
prof.enable()
try:
    run()
finally:
    prof.disable()
    prof.dump_stats(out)
"""


def _agentEnvironment(home: str, user: BenchUser, venvBin: Path) -> dict[str, str]:
    """A small, explicit environment: no CODER_* or other settings leak in."""
    return {
        "HOME": home,
        "USER": user.name,
        "LOGNAME": user.name,
        "SHELL": user.shell,
        "PATH": f"{venvBin}:{STD_PATH}",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def canRunAs(user: BenchUser, python: Path, env: dict[str, str]) -> tuple[bool, str]:
    """Can ``user`` execute the agent's interpreter and import the agent?"""
    r = subprocess.run(
        [*_setpriv(user), str(python), "-c", "import twisted.scripts.twistd, coderagent.tap"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=AGENT_CWD,
    )
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


def _setpriv(user: BenchUser) -> list[str]:
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--"]


#: Where the agent is started: not its sessions' $HOME, as in a workspace
#: (where it starts from / or its install directory).  Twisted could
#: otherwise start sessions with posix_spawn where a real agent forks.
AGENT_CWD = "/"

#: The options the peer harness (../shared/bench/run_all.py) runs the agent
#: with: no metrics, debug or pprof listeners, no boundary socket, no human log.
AGENT_QUIET = [
    "--prometheus-address=",
    "--debug-address=",
    "--pprof-address=",
    "--boundary-log-proxy-socket-path=",
    "--log-human=/dev/null",
]


def startAgent(
    workdir: Path,
    keys: Keys,
    user: BenchUser,
    twistd: Path,
    *,
    agentAs: str = "auto",
    extraArgs: list[str] | tuple[str, ...] = (),
    profile: bool = False,
) -> Server:
    """Start the installed ``twistd -n coder-agent`` on an ephemeral 127.0.0.1 port.

    ``agentAs``: ``bench`` runs it as ``user`` (needs root), ``self`` as the
    invoking user with a temporary ``$HOME``, ``auto`` picks ``bench`` when
    ``user`` can run the installed agent.  It starts in :data:`AGENT_CWD`.
    ``profile`` runs twistd under cProfile; the stats land in
    ``server.profile`` when the agent stops.
    """
    venvBin = twistd.parent
    python = venvBin / "python"
    switch = os.geteuid() == 0 and user.uid != os.geteuid() and agentAs != "self"
    notes: dict[str, str] = {}
    if switch:
        ok, why = canRunAs(user, python, _agentEnvironment(user.home, user, venvBin))
        if not ok:
            if agentAs == "bench":
                raise BenchSetupError(f"user {user.name} cannot run {python}: {why}")
            switch = False
            notes["why not as " + user.name] = (
                f"{user.name} cannot execute {python} ({why.strip()[:80]})"
            )
    data = workdir / "agent-data"
    data.mkdir(mode=0o700)
    log = workdir / "agent.log"
    log.touch(mode=0o644)
    if switch:
        home = user.home
        runAs = user
        for path in (data, log):
            os.chown(path, user.uid, user.gid)
        prefix = _setpriv(user)
    else:
        me = BenchUser.fromPasswd(pwd.getpwuid(os.geteuid()))
        runAs = me
        if me.uid == user.uid:
            home = user.home  # not root: one user for both servers, its real home
        else:
            # root, but the bench user cannot run the agent: a home of our
            # own with the bench user's dotfiles, so the shell reads the same.
            fake = workdir / "agent-home"
            fake.mkdir(mode=0o755)
            for name in (".bashrc", ".profile", ".bash_logout"):
                src = Path(user.home) / name
                if src.is_file():
                    shutil.copy(src, fake / name)
            home = str(fake)
        prefix = []
    notes["runs as"] = runAs.name
    notes["HOME"] = home
    notes["cwd"] = AGENT_CWD
    notes["installed in"] = str(venvBin.parent)
    profileOut = data / "agent.prof"  # data is writable by the agent's user
    command = [str(python), "-c", PROFILED_TWISTD, str(profileOut)] if profile else [str(twistd)]
    env = _agentEnvironment(home, runAs, venvBin)
    for _ in range(3):  # a port free a moment ago may be taken meanwhile
        port = freePort()
        args = [
            *prefix,
            *command,
            "-n",
            "--pidfile=",
            "coder-agent",
            f"--ssh-endpoint=tcp:{port}:interface=127.0.0.1",
            "--agent-url=http://127.0.0.1:9",
            "--agent-token=bench",
            f"--ssh-authorized-keys={keys.authorizedKeys}",
            f"--script-data-dir={data}",
            f"--log-dir={data}",
            *AGENT_QUIET,
            *extraArgs,
        ]
        with open(log, "ab") as out:
            proc = Proc(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=AGENT_CWD
            )
        if waitBanner(port, proc, START_TIMEOUT):
            server = Server("agent", proc, port, runAs.name, log, notes)
            server.profile = profileOut if profile else None
            return server
        proc.stop()
    raise BenchSetupError(f"the agent did not start; its log ({log}):\n{tail(log)}")
