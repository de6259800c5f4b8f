#!/usr/bin/env python3
"""rhio's Kubernetes manifests (k8s/): render the overlays, validate them, check they fit together.

    python3 dev/k8s.py keys   [--overlays k8s/overlays]   # a node key per overlay that has none
    python3 dev/k8s.py render k8s/overlays/cluster-a     # the manifests `kubectl apply -k` applies
    python3 dev/k8s.py check  [--overlays k8s/overlays]   # render, validate, cross-check

`keys` writes `<overlay>/secrets/private-key` (mode 0600, never committed) for every overlay
without one, and replaces the overlay's old public key (`node.pub`) by the new one in every
overlay's config.toml, members.txt and node.pub, so the clusters name each other's new keys.
Overlays need `secrets/credentials.env` too (s3-access-key=..., s3-secret-key=...,
registry-password=..., nats-password=...); `keys` writes a placeholder one when it is missing.

`render` is kustomize's build for the features k8s/ uses (resources, namespace, config map and
secret generators with content-hash names and references to them, strategic-merge patches of
maps, images). It needs only PyYAML, so it runs on machines without kubectl; where `kubectl` is
installed, `check` also compares its output with `kubectl kustomize`.

`check` validates every rendered object against the Kubernetes schemas offline (PyPI
`kubernetes-validate`, strict: unknown fields are errors), checks the config with the `rhio`
binary (`rhio --print-config`, given `--rhio`), and checks the overlays against each other: every
public key an overlay names is the key of an overlay (and that overlay's secrets/private-key
belongs to it), the known nodes' addresses are the other overlays' advertised QUIC addresses, every
overlay has the same members and network id, every node subscribed to by another publishes
datasets, the StatefulSet's grace period outlasts node.shutdown_timeout_secs, the ports agree
with the config, and the Dockerfile builds the user, ports and binaries the manifests expect.
Exit code 1 with one line per problem.
"""

import argparse
import base64
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
NAMESPACED_NOT = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}


# ---------------------------------------------------------------- rendering


def kustomize_hash(obj):
    """The suffix kustomize appends to a generated ConfigMap's or Secret's name.

    kustomize (api/hasher) hashes the JSON of kind, type, data and a name that its path lookup
    never finds (so it is always empty), and keeps 10 hex digits with vowel-like ones replaced.
    """
    encoded = {"kind": obj["kind"], "name": "", "data": obj.get("data") or {}}
    if obj["kind"] == "Secret":
        encoded["type"] = obj.get("type", "Opaque")
    text = json.dumps(encoded, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def kustomize_base64(value):
    """Base64 as kustomize writes Secret data: in lines of 70, each ending in a newline, once the
    encoding is 70 characters or longer (the line breaks are part of the hashed data)."""
    text = base64.b64encode(value).decode()
    if len(text) < 70:
        return text
    return "".join(text[i:i + 70] + "\n" for i in range(0, len(text), 70))


def read_env_file(path):
    pairs = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise SystemExit(f"{path}:{number}: expected KEY=VALUE")
        key, value = line.split("=", 1)
        pairs[key] = value
    return pairs


def generate(entry, kind, base_dir):
    """One ConfigMap or Secret of a configMapGenerator / secretGenerator entry."""
    data = {}
    for item in entry.get("files", []):
        key, _, rel = item.partition("=") if "=" in item else (Path(item).name, "", item)
        path = base_dir / rel
        if not path.is_file():
            raise SystemExit(f"{path} is missing (named by {base_dir / 'kustomization.yaml'})")
        data[key] = path.read_bytes()
    for rel in entry.get("envs", []):
        path = base_dir / rel
        if not path.is_file():
            raise SystemExit(f"{path} is missing (named by {base_dir / 'kustomization.yaml'})")
        data.update({k: v.encode() for k, v in read_env_file(path).items()})
    for literal in entry.get("literals", []):
        key, value = literal.split("=", 1)
        data[key] = value.encode()
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": entry["name"]}}
    if kind == "Secret":
        obj["type"] = entry.get("type", "Opaque")
        obj["data"] = {k: kustomize_base64(v) for k, v in data.items()}
    else:
        obj["data"] = {k: v.decode() for k, v in data.items()}
    obj["_generated"] = True
    return obj


def merge(target, patch):
    """Strategic merge of maps; lists of maps with a `name` merge by name, other lists replace."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        elif (isinstance(value, list) and isinstance(target.get(key), list)
              and all(isinstance(v, dict) and "name" in v for v in value + target[key])):
            for item in value:
                same = [t for t in target[key] if t["name"] == item["name"]]
                if same:
                    merge(same[0], item)
                else:
                    target[key].append(item)
        else:
            target[key] = copy.deepcopy(value)


def set_images(obj, images):
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        # The image's name without tag or digest (a registry port's colon is not a tag).
        name = container["image"].split("@")[0]
        if ":" in name.rsplit("/", 1)[-1]:
            name = name.rsplit(":", 1)[0]
        for image in images:
            if image["name"] == name:
                new = image.get("newName", name)
                container["image"] = f"{new}:{image['newTag']}" if "newTag" in image else new


def build(directory):
    """The objects of the kustomization in `directory` (generated ones not yet renamed)."""
    directory = Path(directory)
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise SystemExit(f"{kfile} is missing")
    spec = yaml.safe_load(kfile.read_text())
    objects = []
    for resource in spec.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += build(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for key, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
        for entry in spec.get(key, []):
            new = generate(entry, kind, directory)
            same = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == entry["name"]]
            behavior = entry.get("behavior", "create")
            if behavior == "create":
                if same:
                    raise SystemExit(f"{kfile}: {kind} {entry['name']} exists already; use behavior: replace")
                objects.append(new)
            elif not same:
                raise SystemExit(f"{kfile}: {kind} {entry['name']} to {behavior} does not exist")
            elif behavior == "replace":
                same[0]["data"] = new["data"]
            else:
                same[0]["data"].update(new["data"])
    for patch in spec.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text())
        target = [o for o in objects if o["kind"] == body["kind"]
                  and o["metadata"]["name"] == body["metadata"]["name"]]
        if not target:
            raise SystemExit(f"{kfile}: patch {patch['path']} matches no object")
        merge(target[0], body)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in NAMESPACED_NOT:
                obj["metadata"]["namespace"] = spec["namespace"]
    for obj in objects:
        set_images(obj, spec.get("images", []))
    return objects


def rename_references(obj, renames):
    """Points volumes, env and envFrom references at the generated objects' hashed names."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("configMap", "configMapKeyRef", "configMapRef") and isinstance(value, dict):
                value["name"] = renames.get(("ConfigMap", value.get("name")), value.get("name"))
            elif key in ("secretKeyRef", "secretRef") and isinstance(value, dict):
                value["name"] = renames.get(("Secret", value.get("name")), value.get("name"))
            elif key == "secret" and isinstance(value, dict) and "secretName" in value:
                value["secretName"] = renames.get(("Secret", value["secretName"]), value["secretName"])
            rename_references(value, renames)
    elif isinstance(obj, list):
        for item in obj:
            rename_references(item, renames)


def render(directory):
    objects = build(directory)
    renames = {}
    for obj in objects:
        if obj.pop("_generated", False):
            name = obj["metadata"]["name"]
            obj["metadata"]["name"] = f"{name}-{kustomize_hash(obj)}"
            renames[(obj["kind"], name)] = obj["metadata"]["name"]
    for obj in objects:
        rename_references(obj, renames)
    return objects


def dump(objects):
    return "---\n".join(yaml.safe_dump(o, sort_keys=True, default_flow_style=False) for o in objects)


def by_kind(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"].startswith(name))]
    return found


# ---------------------------------------------------------------- checks


def overlays_in(root):
    return sorted(p for p in Path(root).iterdir() if (p / "kustomization.yaml").is_file())


def public_key_of(private_key_file):
    """The Ed25519 public key (hex) of a private key file as rhio writes it (hex seed)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    seed = bytes.fromhex(private_key_file.read_text().strip())
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key()
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def members_of(text):
    return sorted(line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip())


def validate(objects, where):
    """Strict schema validation against the Kubernetes schemas bundled in kubernetes-validate."""
    import kubernetes_validate
    problems = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{where}: {obj['kind']} {obj['metadata']['name']}: {err.message} "
                            f"(at {'.'.join(str(p) for p in err.path)})")
        except kubernetes_validate.SchemaNotFoundError as err:
            problems.append(f"{where}: {obj['kind']} {obj['metadata']['name']}: no schema: {err}")
    return problems


def check(args):
    problems = []
    overlays = overlays_in(args.overlays)
    if len(overlays) < 2:
        problems.append(f"{args.overlays}: expected at least two overlays, found {len(overlays)}")
    rendered, configs, keys, advertised = {}, {}, {}, {}
    for overlay in overlays:
        name = overlay.name
        objects = render(overlay)
        rendered[name] = objects
        problems += validate(objects, name)
        if shutil.which("kubectl") and not args.no_kubectl:
            out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
            if out.returncode != 0:
                problems.append(f"{name}: kubectl kustomize failed: {out.stderr.strip()}")
            else:
                theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
                key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
                if sorted(theirs, key=key) != sorted(objects, key=key):
                    problems.append(f"{name}: dev/k8s.py render differs from kubectl kustomize")
        configmap = by_kind(objects, "ConfigMap", "rhio-config")[0]
        config = tomllib.loads(configmap["data"]["config.toml"])
        configs[name] = config
        members = members_of(configmap["data"].get("members.txt", ""))
        config["_members"] = members
        keys[name] = (overlay / "node.pub").read_text().strip()
        private = overlay / "secrets" / "private-key"
        if private.is_file():
            derived = public_key_of(private)
            if derived != keys[name]:
                problems.append(f"{name}: secrets/private-key belongs to {derived}, but node.pub says "
                                f"{keys[name]} (run dev/k8s.py keys after replacing a key)")
        quic = by_kind(objects, "Service", "rhio-quic")[0]
        advertised[name] = quic["metadata"].get("annotations", {}).get("rhio/advertised-address")
        if not advertised[name]:
            problems.append(f"{name}: Service rhio-quic has no rhio/advertised-address annotation")
        problems += check_pod(name, objects, config)
        if args.rhio:
            secret = by_kind(objects, "Secret", "rhio-secrets")[0]
            env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
            if "registry-password" in secret["data"]:
                env["RHIO_MIRROR__PASSWORD"] = "x"
            with_files = Path(args.scratch) / name
            with_files.mkdir(parents=True, exist_ok=True)
            for file, text in configmap["data"].items():
                (with_files / file).write_text(text)
            toml = (with_files / "config.toml").read_text().replace("/etc/rhio/", f"{with_files}/")
            (with_files / "config.toml").write_text(toml)
            out = subprocess.run([args.rhio, "-c", str(with_files / "config.toml"), "--print-config"],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                problems.append(f"{name}: rhio rejects the config: {out.stderr.strip()}")
    by_key = {key: name for name, key in keys.items()}
    for name, config in configs.items():
        network = config.get("network", {})
        for node in network.get("known_nodes", []):
            other = by_key.get(node["public_key"])
            if other is None:
                problems.append(f"{name}: known node {node['public_key'][:16]}... is no overlay's node.pub")
            elif advertised.get(other) not in node.get("addresses", []):
                problems.append(f"{name}: known node {other} is listed at {node.get('addresses')}, but "
                                f"{other} advertises {advertised.get(other)}")
        for entry in config.get("subscribe", []):
            other = by_key.get(entry["public_key"])
            if other is None:
                problems.append(f"{name}: subscribes to {entry['public_key'][:16]}..., no overlay's node.pub")
            elif other == name:
                problems.append(f"{name}: subscribes to its own key")
        if sorted(config["_members"]) != sorted(keys.values()):
            problems.append(f"{name}: members.txt lists {len(config['_members'])} keys that are not "
                            f"exactly the {len(keys)} overlays' node.pub keys")
        if network.get("network_id") != next(iter(configs.values()))["network"].get("network_id"):
            problems.append(f"{name}: network_id differs from the other overlays'")
    subscribed = {by_key.get(e["public_key"]) for c in configs.values() for e in c.get("subscribe", [])}
    for name in configs:
        if name not in subscribed:
            problems.append(f"{name}: no other overlay subscribes to this node")
    problems += check_dockerfile(rendered)
    for problem in problems:
        print(problem)
    if problems:
        sys.exit(1)
    print(f"ok: {len(overlays)} overlays, {sum(len(o) for o in rendered.values())} objects valid; "
          "keys, addresses, members and ports fit together")


def check_pod(name, objects, config):
    problems = []
    sts = by_kind(objects, "StatefulSet", "rhio")[0]
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    grace = pod.get("terminationGracePeriodSeconds", 30)
    shutdown = config.get("node", {}).get("shutdown_timeout_secs", 10)
    if grace <= shutdown:
        problems.append(f"{name}: terminationGracePeriodSeconds {grace} is not longer than "
                        f"node.shutdown_timeout_secs {shutdown}")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if ports.get("quic") != config.get("network", {}).get("bind_port", 9102):
        problems.append(f"{name}: container port quic {ports.get('quic')} is not network.bind_port")
    http_port = int(config.get("http", {}).get("bind", "0.0.0.0:8080").rsplit(":", 1)[1])
    if ports.get("http") != http_port:
        problems.append(f"{name}: container port http {ports.get('http')} is not http.bind's port")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    if mounts.get("data") != config.get("node", {}).get("data_dir"):
        problems.append(f"{name}: the data volume is not mounted at node.data_dir")
    if "/etc/rhio/config.toml" not in container.get("args", []) or mounts.get("config") != "/etc/rhio":
        problems.append(f"{name}: the config is not mounted where the container reads it")
    if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
        problems.append(f"{name}: the pod may run as root")
    return problems


def check_dockerfile(rendered):
    """The image the Dockerfile builds is the one the manifests expect."""
    problems = []
    text = (ROOT / "Dockerfile").read_text()
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    rust = cargo["workspace"]["package"]["rust-version"]
    if not re.search(rf"^FROM rust:{re.escape(rust)}[-\w.]* AS build$", text, re.M):
        problems.append(f"Dockerfile: the build stage is not FROM rust:{rust} (rust-version)")
    if "--locked" not in text:
        problems.append("Dockerfile: cargo build without --locked")
    metadata = subprocess.run(["cargo", "metadata", "--no-deps", "--format-version", "1"], cwd=ROOT,
                              capture_output=True, text=True, check=True)
    bins = {t["name"] for p in json.loads(metadata.stdout)["packages"] for t in p["targets"] if "bin" in t["kind"]}
    for binary in ("rhio", "rhio-client"):
        if binary not in bins:
            problems.append(f"Dockerfile: the workspace has no binary {binary}")
        if f"--bin {binary}" not in text or f"release/{binary} " not in text + " ":
            problems.append(f"Dockerfile: does not build and copy the {binary} binary")
    for name, objects in rendered.items():
        pod = by_kind(objects, "StatefulSet", "rhio")[0]["spec"]["template"]["spec"]
        uid = pod["securityContext"]["runAsUser"]
        if not re.search(rf"^USER {uid}(:\d+)?$", text, re.M):
            problems.append(f"Dockerfile: USER is not {uid}, the manifests' runAsUser ({name})")
        for port in pod["containers"][0]["ports"]:
            expose = f"{port['containerPort']}/{port['protocol'].lower()}"
            if expose not in text:
                problems.append(f"Dockerfile: does not EXPOSE {expose} ({name})")
        image = pod["containers"][0]["image"]
        version = cargo["workspace"]["package"]["version"]
        if not image.endswith(f"/rhio:{version}"):
            problems.append(f"{name}: image {image} is not <registry>/rhio:{version} (the workspace version)")
    return problems


# ---------------------------------------------------------------- keys


def keys(args):
    overlays = overlays_in(args.overlays)
    for overlay in overlays:
        secrets = overlay / "secrets"
        secrets.mkdir(exist_ok=True)
        credentials = secrets / "credentials.env"
        if not credentials.exists():
            credentials.write_text("s3-access-key=CHANGE_ME\ns3-secret-key=CHANGE_ME\n"
                                   "registry-password=CHANGE_ME\n")
            credentials.chmod(0o600)
        private = secrets / "private-key"
        if private.exists():
            continue
        out = subprocess.run([args.rhio_client, "keygen", "--out", str(private)],
                             capture_output=True, text=True, check=True)
        new = out.stdout.strip()
        old = (overlay / "node.pub").read_text().strip() if (overlay / "node.pub").exists() else None
        (overlay / "node.pub").write_text(new + "\n")
        if old:
            for other in overlays:
                for file in ("config.toml", "members.txt"):
                    path = other / file
                    path.write_text(path.read_text().replace(old, new))
        print(f"{overlay.name}: new key {new}" + (f" (replaces {old})" if old else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/rhio/target")) / "debug"
    for name in ("keys", "check"):
        p = sub.add_parser(name)
        p.add_argument("--overlays", default=str(ROOT / "k8s" / "overlays"))
        if name == "keys":
            p.add_argument("--rhio-client", default=shutil.which("rhio-client") or str(target / "rhio-client"))
        else:
            p.add_argument("--rhio", default=shutil.which("rhio") or str(target / "rhio"))
            p.add_argument("--scratch", default=None)
            p.add_argument("--no-kubectl", action="store_true", help="do not compare with kubectl kustomize")
    p = sub.add_parser("render")
    p.add_argument("overlay")
    args = parser.parse_args()
    if args.command == "render":
        print(dump(render(args.overlay)), end="")
    elif args.command == "keys":
        keys(args)
    else:
        import tempfile
        with tempfile.TemporaryDirectory() as scratch:
            args.scratch = args.scratch or scratch
            if not Path(args.rhio).is_file():
                raise SystemExit(f"{args.rhio} is missing: build the workspace first")
            check(args)


if __name__ == "__main__":
    main()
