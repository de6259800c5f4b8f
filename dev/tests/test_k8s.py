"""dev/k8s.py check: the committed overlays pass, and each kind of mistake is reported."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
K8S = [sys.executable, str(ROOT / "dev" / "k8s.py")]


@pytest.fixture
def overlays(tmp_path):
    """A copy of k8s/ with fresh keys and credentials, as an operator prepares it."""
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s", ignore=shutil.ignore_patterns("secrets"))
    out = subprocess.run(K8S + ["keys", "--overlays", str(tmp_path / "k8s/overlays")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.count("new key") == 2, out.stdout
    return tmp_path / "k8s/overlays"


def check(overlays):
    return subprocess.run(K8S + ["check", "--overlays", str(overlays)], capture_output=True, text=True)


def edit(path, old, new):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_the_example_overlays_render_validate_and_fit_together(overlays):
    out = check(overlays)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok: 2 overlays" in out.stdout
    # keys replaced the committed public keys everywhere: no old key is left in any config.
    committed = {(ROOT / "k8s/overlays" / o / "node.pub").read_text().strip() for o in ("cluster-a", "cluster-b")}
    for overlay in overlays.iterdir():
        for name in ("config.toml", "members.txt"):
            text = (overlay / name).read_text()
            assert not any(key in text for key in committed), f"{overlay.name}/{name} names an old key"


def test_render_matches_kubectl_where_kubectl_exists(overlays):
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed; dev/k8s.py render is checked against it where it is")
    ours = subprocess.run(K8S + ["render", str(overlays / "cluster-b")], capture_output=True, text=True, check=True)
    theirs = subprocess.run(["kubectl", "kustomize", str(overlays / "cluster-b")], capture_output=True, text=True, check=True)
    import yaml
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(ours.stdout), key=key) == sorted(yaml.safe_load_all(theirs.stdout), key=key)


@pytest.mark.parametrize("mistake, expected", [
    ("subscribe", "no overlay's node.pub"),
    ("address", "advertises"),
    ("schema", "StatefulSet rhio"),
    ("grace", "terminationGracePeriodSeconds 15 is not longer"),
    ("members", "members.txt lists"),
    ("private-key", "secrets/private-key belongs to"),
    ("config", "rhio rejects the config"),
])
def test_mistakes_are_reported(overlays, mistake, expected):
    a, b = overlays / "cluster-a", overlays / "cluster-b"
    key_a = (a / "node.pub").read_text().strip()
    if mistake == "subscribe":
        edit(b / "config.toml", f'public_key = "{key_a}"\nsubjects = ["datasets.>"]', f'public_key = "{"ab" * 32}"\nsubjects = ["datasets.>"]')
    elif mistake == "address":
        edit(b / "config.toml", "203.0.113.10:9102", "203.0.113.11:9102")
    elif mistake == "schema":
        edit(overlays.parent / "base/statefulset.yaml", "  replicas: 1", "  replicas: one")
    elif mistake == "grace":
        edit(overlays.parent / "base/statefulset.yaml", "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 15")
    elif mistake == "members":
        edit(a / "members.txt", key_a, "")
    elif mistake == "private-key":
        shutil.copy(b / "secrets/private-key", a / "secrets/private-key")
    elif mistake == "config":
        edit(a / "config.toml", "[network]", "[network]\nbind_prot = 9102")
    out = check(overlays)
    assert out.returncode == 1, out.stdout + out.stderr
    assert expected in out.stdout, out.stdout + out.stderr


def test_the_stream_definitions_and_nats_settings_are_accepted_by_nats_server(tmp_path):
    nats_server = Path(sys.executable).parent / "nats-server"
    conf = tmp_path / "nats.conf"
    conf.write_text((ROOT / "k8s/jetstream/nats-server.conf").read_text().replace("/data/jetstream", str(tmp_path / "js")))
    out = subprocess.run([str(nats_server), "-c", str(conf), "-t"], capture_output=True, text=True)
    assert out.returncode == 0 and "is valid" in out.stdout + out.stderr, out.stdout + out.stderr
    # The streams themselves are created on a real server by the walkthrough (section 1).
    assert sorted(p.stem for p in (ROOT / "k8s/jetstream").glob("*.json")) == ["ANNOUNCEMENTS", "DATASETS", "RHIO_IMPORTS"]
