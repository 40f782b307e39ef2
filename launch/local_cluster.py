#!/usr/bin/env python3
"""A cluster of N nodes on one host, to rehearse the `deepspeed` launcher's multi-node path (a
hostfile, pdsh over ssh, gloo between hosts) where there is no cluster. Needs root, `ip netns`,
sshd, ssh and pdsh (apt-get install openssh-server pdsh).

    sudo .venv/bin/python launch/local_cluster.py -- train deepspeed.teacher=teacher-inference
    ... launch/local_cluster.py --lose kill --lose-after-step 5:student -- train ...
    ... launch/local_cluster.py --lose link --lose-after-step 5:student --retries 2 -- train ... --auto-resume
    launch/local_cluster.py --dry-run -- train ...     # print the plan, touch nothing
    launch/local_cluster.py --check                    # can this machine run it? (exit 3 if not)

What it makes, all of it in a temporary folder and in network namespaces of its own:
  - one namespace per node, eth0 = 10.77.0.<i+1>/24, joined through veth pairs by a bridge in a
    "switch" namespace;
  - in each node an sshd on eth0:22, in a mount and UTS namespace of its own (hostname node<i>;
    /etc/hosts names every node; /run a private tmpfs for sshd's privilege-separation folder),
    with a host key and a client key pair made for this cluster (never the machine's keys);
  - an `ssh` wrapper first on PATH that points ssh (DeepSpeed's ssh check, pdsh) at the
    cluster's client config (the throwaway key, host keys not checked);
  - a hostfile (`node<i> slots=S`) and a DeepSpeed environment file (DS_ENV_FILE) with what every
    rank needs: GLOO_SOCKET_IFNAME=eth0, MATEKD_COLLECTIVE_TIMEOUT_S, OMP_NUM_THREADS and this
    environment's MATEKD_*, HF_*, TRANSFORMERS_*, TOKENIZERS_* and TRITON_* variables.
Then, from node0's namespace:
    deepspeed --hostfile HOSTFILE --launcher pdsh --master_addr node0 --master_port 29500 \\
              --module matekd_ds ARGS
(through launch/retry.sh with --retries). At the end it prints each node's interface byte
counters over the run: the ranks of different nodes can only reach each other through eth0.
Everything is torn down on exit, after a failure, Ctrl-C or SIGTERM: every process in the
namespaces is killed, the namespaces (and their veths) deleted, the folder removed; leftovers of
a run that was killed outright (SIGKILL) are removed by the next one.

--lose kill|link with --lose-after-step STEP[:PHASE] takes the last node away mid-run: its first
rank holds after that step (MATEKD_HOLD_AFTER_STEP, matekd_ds/faults.py) while its peers wait
for it at the next collective; then every process of the node is killed (kill -9), or its link
is taken down (ip link set eth0 down). The survivors must exit within the collective timeout
(plus a few seconds) with one line naming the lost rank and host. With --retries N the command
runs under launch/retry.sh; before each retry the lost node "comes back" (its processes killed,
its link up, a fresh sshd) and the fault is not injected again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUBNET = "10.77.0"  # private to the namespaces: their routing tables hold nothing else
IFACE = "eth0"  # each node's end of its veth pair
MASTER_PORT = 29500  # free in node0's namespace: nothing else listens there
TAG_PREFIX = "mkc"  # namespaces and folders are named mkc<pid>-...: leftovers of a dead pid are removed
FORWARDED_PREFIXES = ("MATEKD_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "TRITON_")
HERE = Path(__file__).resolve().parent
SSH_OPTIONS = """  User root
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
  ConnectTimeout 5
  # a node cut off mid-run ends its ssh session (and so pdsh and the launcher) in about 6 s
  ServerAliveInterval 2
  ServerAliveCountMax 3
"""


def log(message: str) -> None:
    print(f"local_cluster: {message}", file=sys.stderr, flush=True)


def run(*cmd: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True, stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------------------------------------
# The layout: names, addresses, hostfile


@dataclass(frozen=True)
class Layout:
    nodes: int
    slots: int  # ranks per node
    tag: str  # unique to this cluster: mkc<pid>-<hex>

    @classmethod
    def new(cls, nodes: int, slots: int) -> Layout:
        return cls(nodes, slots, f"{TAG_PREFIX}{os.getpid()}-{os.urandom(2).hex()}")

    def namespace(self, node: int) -> str:
        return f"{self.tag}-node{node}"

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def host(self, node: int) -> str:
        return f"node{node}"

    def address(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    def first_rank(self, node: int) -> int:
        return node * self.slots

    def hostfile(self) -> str:
        return "".join(f"{self.host(i)} slots={self.slots}\n" for i in range(self.nodes))

    def hosts_file(self) -> str:
        return "127.0.0.1 localhost\n" + "".join(f"{self.address(i)} {self.host(i)}\n" for i in range(self.nodes))


def launcher_command(hostfile: Path, matekd_args: list[str]) -> list[str]:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")  # this environment's launcher
    return [deepspeed, "--hostfile", str(hostfile), "--launcher", "pdsh", "--master_addr", "node0",
            "--master_port", str(MASTER_PORT), "--module", "matekd_ds", *matekd_args]


def rank_environment(layout: Layout, timeout_s: float, extra: dict[str, str]) -> dict[str, str]:
    """What every rank gets through DeepSpeed's environment file (pdsh starts them with sshd's
    bare environment)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) and "\n" not in v}
    ranks_on_this_host = layout.nodes * layout.slots  # the nodes share this machine's cores
    env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS")
                   or str(max(1, (os.cpu_count() or 1) // ranks_on_this_host)))
    env.update(GLOO_SOCKET_IFNAME=IFACE, MATEKD_COLLECTIVE_TIMEOUT_S=f"{timeout_s:g}", **extra)
    return env


# ---------------------------------------------------------------------------------------------
# Can this machine do it?


def missing_prerequisite() -> str | None:
    """Why a local cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, an sshd per node)"
    for tool in ("ip", "unshare", "mount", "ssh", "ssh-keygen", "pdsh"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install iproute2 util-linux openssh-client openssh-server pdsh)"
    if sshd_path() is None:
        return "sshd not found (apt-get install openssh-server)"
    try:
        import pwd
        pwd.getpwnam("sshd")
    except KeyError:
        return "no 'sshd' user for sshd's privilege separation (apt-get install openssh-server)"
    version = run("pdsh", "-V", check=False)
    if "ssh" not in version.stdout + version.stderr:  # "rcmd modules: ssh,rsh,exec"
        return "pdsh has no ssh module (apt-get install pdsh)"
    if not (Path(sys.executable).parent / "deepspeed").exists():
        return f"no deepspeed launcher next to {sys.executable}"
    probe = f"{TAG_PREFIX}{os.getpid()}-probe"
    made = run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()[:200]}"
    bridge = run("ip", "-n", probe, "link", "add", "br0", "type", "bridge", check=False)
    run("ip", "netns", "del", probe, check=False)
    if bridge.returncode != 0:
        return f"cannot make a bridge in a namespace: {bridge.stderr.strip()[:200]}"
    return None


def sshd_path() -> str | None:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    return str(Path(found).resolve()) if found else None  # sshd re-executes itself: an absolute path


# ---------------------------------------------------------------------------------------------
# The cluster


def namespace_pids(namespace: str) -> list[int]:
    listed = run("ip", "netns", "pids", namespace, check=False)
    return [int(p) for p in listed.stdout.split()] if listed.returncode == 0 else []


def kill_namespace(namespace: str) -> None:
    """kill -9 every process in the namespace (a node's sshd, its sessions, its ranks)."""
    for _ in range(20):  # a dying launcher may start a process after the listing: list again
        pids = namespace_pids(namespace)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> None:
    """Namespaces and folders of clusters whose process died without tearing down (SIGKILL)."""
    pattern = re.compile(rf"^{TAG_PREFIX}(\d+)-")
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = pattern.match(name)
        if match and not _pid_alive(int(match.group(1))):
            kill_namespace(name)
            run("ip", "netns", "del", name, check=False)
    for folder in Path(tempfile.gettempdir()).glob(f"{TAG_PREFIX}*-cluster"):
        match = pattern.match(folder.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class LocalCluster:
    layout: Layout
    folder: Path = field(default=None)  # type: ignore[assignment]
    lost: list[int] = field(default_factory=list)  # nodes taken away, to bring back before a retry

    # --- files ---
    @property
    def hostfile(self) -> Path:
        return self.folder / "hostfile"

    @property
    def env_file(self) -> Path:
        return self.folder / "deepspeed_env"

    def __enter__(self) -> LocalCluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        remove_leftovers()
        self.folder = Path(tempfile.gettempdir()) / f"{self.layout.tag}-cluster"
        self.folder.mkdir(mode=0o700)
        self._write_keys_and_configs()
        self._make_network()
        for node in range(self.layout.nodes):
            self.start_sshd(node)
        self.wait_for_ssh()
        self.save_state()

    def down(self) -> None:
        """Everything up() made, even half-made: processes, namespaces, the folder."""
        names = [self.layout.namespace(i) for i in range(self.layout.nodes)] + [self.layout.switch]
        for name in names:
            kill_namespace(name)
        for name in names:
            run("ip", "netns", "del", name, check=False)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _write_keys_and_configs(self) -> None:
        f = self.folder
        for key in ("host_key", "client_key"):
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"matekd local cluster {key}", "-f", str(f / key))
        shutil.copy(f / "client_key.pub", f / "authorized_keys")
        (f / "hosts").write_text(self.layout.hosts_file())
        self.hostfile.write_text(self.layout.hostfile())
        for node in range(self.layout.nodes):
            (f / f"sshd_node{node}.conf").write_text(self._sshd_config(node))
        (f / "ssh_config").write_text("".join(
            f"Host {self.layout.host(i)}\n  HostName {self.layout.address(i)}\n" for i in range(self.layout.nodes))
            + f"Host *\n  IdentityFile {f / 'client_key'}\n" + SSH_OPTIONS)
        (f / "bin").mkdir()
        wrapper = f / "bin" / "ssh"  # DeepSpeed's ssh check and pdsh call `ssh` from PATH
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {f / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)

    def _sshd_config(self, node: int) -> str:
        f = self.folder
        return (f"ListenAddress {self.layout.address(node)}\nPort 22\nHostKey {f / 'host_key'}\n"
                f"AuthorizedKeysFile {f / 'authorized_keys'}\nPidFile {f / f'sshd_node{node}.pid'}\n"
                "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "PermitRootLogin prohibit-password\nPrintMotd no\nPrintLastLog no\nUseDNS no\n"
                "MaxStartups 100\nClientAliveInterval 2\nClientAliveCountMax 3\n")

    def _make_network(self) -> None:
        sw = self.layout.switch
        run("ip", "netns", "add", sw)
        run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", sw, "link", "set", "br0", "up")
        for node in range(self.layout.nodes):
            ns, port = self.layout.namespace(node), f"node{node}"
            run("ip", "netns", "add", ns)
            run("ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", IFACE, "netns", ns)
            run("ip", "-n", sw, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{self.layout.address(node)}/24", "dev", IFACE)
            run("ip", "-n", ns, "link", "set", IFACE, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    def start_sshd(self, node: int) -> None:
        """The node's sshd, in mount and UTS namespaces of its own that its sessions (the ranks)
        inherit: the node's hostname, /etc/hosts naming every node, a private /run for sshd."""
        f = self.folder
        boot = (f"hostname {self.layout.host(node)} && mount -t tmpfs -o mode=0755 tmpfs /run "
                f"&& mkdir -m 0755 /run/sshd && mount --bind {f / 'hosts'} /etc/hosts "
                f"&& exec {sshd_path()} -D -f {f / f'sshd_node{node}.conf'} -E {f / f'sshd_node{node}.log'}")
        with open(f / f"boot_node{node}.log", "ab") as out:
            subprocess.Popen(["ip", "netns", "exec", self.layout.namespace(node), "unshare", "--uts", "--",
                              "sh", "-c", boot], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True)

    def wait_for_ssh(self, nodes: list[int] | None = None, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        for node in nodes if nodes is not None else range(self.layout.nodes):
            while True:
                probe = subprocess.run(self.on_node0(["ssh", self.layout.host(node), "true"]), env=self.env(),
                                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
                if probe.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd on {self.layout.host(node)} did not answer: {probe.stderr.strip()}; "
                                       f"see {self.folder}/boot_node{node}.log and sshd_node{node}.log")
                time.sleep(0.2)

    # --- running things ---
    def on_node0(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.layout.namespace(0), *cmd]

    def env(self) -> dict[str, str]:
        """The launcher's environment: the ssh wrapper first on PATH, the ranks' environment file."""
        path = os.pathsep.join([str(self.folder / "bin"), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, "PATH": path, "DS_ENV_FILE": str(self.env_file), "PDSH_RCMD_TYPE": "ssh"}

    def write_rank_environment(self, env: dict[str, str]) -> None:
        # DeepSpeed reads DS_ENV_FILE joined to ~ and to the working folder: an absolute path is
        # read as is (twice, harmlessly), and ~/.deepspeed_env is left out
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))

    def counters(self) -> dict[str, dict[str, dict[str, int]]]:
        """Each node's byte counters: eth0 (its veth, the only way to another node) and lo."""
        out = {}
        for node in range(self.layout.nodes):
            shown = run("ip", "-j", "-s", "-n", self.layout.namespace(node), "link", "show")
            links = {link["ifname"]: link["stats64"] for link in json.loads(shown.stdout)}
            out[self.layout.host(node)] = {name: {"rx_bytes": links[name]["rx"]["bytes"],
                                                  "tx_bytes": links[name]["tx"]["bytes"]}
                                           for name in (IFACE, "lo")}
        return out

    # --- faults ---
    def lose(self, node: int, how: str) -> None:
        self.lost.append(node)
        self.save_state()
        if how == "kill":
            kill_namespace(self.layout.namespace(node))
        else:
            run("ip", "-n", self.layout.namespace(node), "link", "set", IFACE, "down")

    def bring_back(self) -> None:
        """The lost nodes come back, as from a reboot: their processes gone, link up, a fresh sshd;
        and the fault is not injected again."""
        nodes, self.lost = list(self.lost), []
        kept = [line for line in self.env_file.read_text().splitlines() if not line.startswith("MATEKD_HOLD_")]
        self.env_file.write_text("".join(f"{line}\n" for line in kept))
        for node in nodes:
            kill_namespace(self.layout.namespace(node))
            run("ip", "-n", self.layout.namespace(node), "link", "set", IFACE, "up")
            self.start_sshd(node)
        self.wait_for_ssh(nodes)
        self.save_state()

    # --- state, for `heal` (launch/retry.sh's RETRY_HOOK runs it in another process) ---
    def save_state(self) -> None:
        (self.folder / "cluster.json").write_text(json.dumps({"layout": asdict(self.layout), "lost": self.lost}))

    @classmethod
    def from_state(cls, folder: Path) -> LocalCluster:
        state = json.loads((folder / "cluster.json").read_text())
        return cls(Layout(**state["layout"]), folder, state["lost"])


# ---------------------------------------------------------------------------------------------
# A rehearsal: one launcher command on the cluster, perhaps losing a node


@dataclass
class Fault:
    how: str  # kill | link
    after_step: str  # STEP[:PHASE]
    node: int
    rank: int
    survivor_line: str | None = None  # the first "matekd: error: " line after the fault
    survivor_line_after_s: float | None = None  # seconds after the fault
    attempt_ended_after_s: float | None = None  # the launcher (the first attempt) exited, seconds after
    injected_at: float | None = field(default=None, repr=False)  # time.monotonic()

    def timings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "injected_at"}


def _heal_hook(cluster: LocalCluster) -> str:
    """What launch/retry.sh runs before a retry: LocalCluster.bring_back, in another process."""
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} heal {cluster.folder}"


def rehearse(cluster: LocalCluster, args) -> dict:
    layout = cluster.layout
    fault = None
    extra = dict(item.split("=", 1) for item in args.env)
    if args.lose:
        node = layout.nodes - 1
        fault = Fault(args.lose, args.lose_after_step, node, layout.first_rank(node))
        extra.update(MATEKD_HOLD_AFTER_STEP=args.lose_after_step, MATEKD_HOLD_RANKS=str(fault.rank),
                     MATEKD_HOLD_SECONDS="3600")
    env = rank_environment(layout, args.timeout_s, extra)
    cluster.write_rank_environment(env)
    command = launcher_command(cluster.hostfile, args.matekd_args)
    launcher_env = cluster.env()
    if args.retries:
        launcher_env.update(RETRIES=str(args.retries), RETRY_DELAY_S=f"{args.retry_delay_s:g}",
                            RETRY_HOOK=_heal_hook(cluster))
        command = ["bash", str(HERE / "retry.sh"), *command]
    log(f"hostfile:\n{layout.hostfile().rstrip()}")
    log(f"from node0: {shlex.join(command)}")
    before = cluster.counters()
    started = time.monotonic()
    code = _watch(cluster, command, launcher_env, fault, args.deadline_s)
    report = {"tag": layout.tag, "folder": str(cluster.folder),
              "nodes": {layout.host(i): layout.address(i) for i in range(layout.nodes)},
              "hostfile": layout.hostfile(), "command": command, "rank_environment": env, "exit_code": code,
              "wall_s": round(time.monotonic() - started, 1),
              "bytes": _deltas(before, cluster.counters()), "fault": fault.timings() if fault else None}
    _print_counters(report["bytes"])
    return report


def _watch(cluster: LocalCluster, command: list[str], env: dict[str, str], fault: Fault | None,
           deadline_s: float) -> int:
    """Run the launcher from node0, pass its output on, inject the fault when the node to lose
    holds, and time what the survivors do."""
    proc = subprocess.Popen(cluster.on_node0(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, bufsize=1)
    timer = threading.Timer(deadline_s, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if fault is not None:
                _follow_fault(cluster, fault, line)
        code = proc.wait()
    finally:
        timer.cancel()
    if fault is not None and fault.injected_at is not None and fault.attempt_ended_after_s is None:
        fault.attempt_ended_after_s = round(time.monotonic() - fault.injected_at, 1)
    return code


def _follow_fault(cluster: LocalCluster, fault: Fault, line: str) -> None:
    if fault.injected_at is None and f"matekd: rank {fault.rank} holding" in line:
        cluster.lose(fault.node, fault.how)
        fault.injected_at = time.monotonic()
        log(f"{'killed every process of' if fault.how == 'kill' else 'took down the link of'} "
            f"{cluster.layout.host(fault.node)}")
    elif fault.injected_at is not None:
        since = round(time.monotonic() - fault.injected_at, 1)
        if "matekd: error: " in line and fault.survivor_line is None:
            fault.survivor_line, fault.survivor_line_after_s = line.strip(), since
        if "launch/retry.sh: attempt 1 failed" in line and fault.attempt_ended_after_s is None:
            fault.attempt_ended_after_s = since


def _deltas(before: dict, after: dict) -> dict:
    return {node: {iface: {k: after[node][iface][k] - v for k, v in counts.items()}
                   for iface, counts in ifaces.items()} for node, ifaces in before.items()}


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"


def _print_counters(deltas: dict) -> None:
    log(f"bytes through each node's interfaces during the run ({IFACE}: its veth, the only link to "
        "another node; lo: its loopback):")
    for node, ifaces in deltas.items():
        log(f"  {node}  " + "  ".join(f"{iface} rx {_size(c['rx_bytes'])} tx {_size(c['tx_bytes'])}"
                                     for iface, c in ifaces.items()))


# ---------------------------------------------------------------------------------------------
# Command line


def plan(layout: Layout, args) -> str:
    env = rank_environment(layout, args.timeout_s, dict(item.split("=", 1) for item in args.env))
    lines = [f"{layout.host(i)}: namespace {layout.namespace(i)}, {IFACE} {layout.address(i)}/24, sshd on port 22"
             for i in range(layout.nodes)]
    lines += [f"switch: namespace {layout.switch}, bridge br0 joining the veth pairs",
              "keys: a host key and a client key pair made for this cluster, in a temporary folder",
              "hostfile:", *("  " + line for line in layout.hostfile().splitlines()),
              "rank environment (DS_ENV_FILE): " + " ".join(f"{k}={v}" for k, v in env.items()),
              "from node0: " + shlex.join(launcher_command(Path("HOSTFILE"), args.matekd_args))]
    if args.lose:
        node = layout.nodes - 1
        lines.append(f"fault: rank {layout.first_rank(node)} holds after step {args.lose_after_step}; then "
                     + ("kill -9 every process of" if args.lose == "kill" else "ip link set eth0 down on")
                     + f" {layout.host(node)}")
    if args.retries:
        lines.append(f"retries: up to {args.retries} through launch/retry.sh, the lost node back before each")
    lines.append("teardown: kill every process in the namespaces, delete them, remove the folder")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2, help="how many nodes (default 2)")
    parser.add_argument("--slots", type=int, default=1, help="ranks per node (default 1)")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="the ranks' collective timeout, MATEKD_COLLECTIVE_TIMEOUT_S (default 60)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="more rank environment")
    parser.add_argument("--lose", choices=("kill", "link"), help="take the last node away mid-run")
    parser.add_argument("--lose-after-step", default="5:student", metavar="STEP[:PHASE]",
                        help="when: after this step of its first rank (default 5:student)")
    parser.add_argument("--retries", type=int, default=0, help="rerun through launch/retry.sh up to N times")
    parser.add_argument("--retry-delay-s", type=float, default=2.0, help="wait before a retry (default 2)")
    parser.add_argument("--deadline-s", type=float, default=3600.0, help="kill the launcher after this long")
    parser.add_argument("--report", type=Path, help="write what happened (exit code, fault timings, bytes) as JSON")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and touch nothing")
    parser.add_argument("--check", action="store_true", help="say whether this machine can run a local cluster")
    parser.add_argument("matekd_args", nargs="*", help="after --: the matekd arguments (train ...)")
    return parser


def _stop_on_signals() -> None:
    def stop(signum, frame):
        raise SystemExit(128 + signum)  # unwinds through LocalCluster.__exit__: the teardown
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "heal":  # launch/retry.sh's RETRY_HOOK
        LocalCluster.from_state(Path(argv[1])).bring_back()
        return 0
    args = _parser().parse_args(argv)
    if args.nodes < 2 or args.slots < 1 or any("=" not in item for item in args.env):
        log("error: --nodes must be >= 2, --slots >= 1, --env NAME=VALUE")
        return 2
    layout = Layout.new(args.nodes, args.slots)
    if args.dry_run:
        print(plan(layout, args))
        return 0
    problem = missing_prerequisite()
    if args.check or problem:
        log(f"not available here: {problem}" if problem else "ready")
        return 3 if problem else 0
    _stop_on_signals()
    with LocalCluster(layout) as cluster:
        log(f"cluster {layout.tag} up: " + ", ".join(f"{layout.host(i)} {layout.address(i)}"
                                                     for i in range(layout.nodes)))
        report = rehearse(cluster, args)
    log("torn down")
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
