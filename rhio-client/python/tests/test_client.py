"""rhio_client against real servers: two clusters (NATS with JetStream + S3 each, from
dev/localenv.py) and two rhio nodes (the binary of `cargo build`, $RHIO_BIN or
$CARGO_TARGET_DIR/debug/rhio) connected over loopback QUIC. Node A imports and publishes; node B
replicates A's datasets and receives A's messages."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rhio_client

ROOT = Path(__file__).resolve().parents[3]
WAIT = 120


def rhio_bin():
    if os.environ.get("RHIO_BIN"):
        return Path(os.environ["RHIO_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/rhio/target"))
    return target / "debug" / "rhio"


# The environment's own port picker (never the same port twice in one run).
sys.path.insert(0, str(ROOT / "dev"))
from localenv import free_port  # noqa: E402


def wait_for(what, condition, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def health(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return json.load(r)
    except Exception as err:  # a 503 or a node not up yet
        body = getattr(err, "read", None)
        return json.loads(body()) if body else None


class Cluster:
    def __init__(self, env, index):
        self.__dict__.update(env["clusters"][index])


@pytest.fixture(scope="module")
def clusters():
    """Two clusters and two connected nodes; A publishes news.>, B takes A's news and datasets."""
    tmp = tempfile.TemporaryDirectory(prefix="rhio-py-")
    base = Path(tmp.name)
    out = subprocess.run(
        ["python3", str(ROOT / "dev/localenv.py"),
         "up", "--dir", str(base / "env"), "--clusters", "2", "--owner-pid", str(os.getpid())],
        check=True, capture_output=True, text=True,
    )
    env = json.loads(out.stdout)
    a, b = Cluster(env, 0), Cluster(env, 1)
    data = base / "data"
    data.mkdir()
    keys, ports, procs = {}, {}, []
    for name in ("a", "b"):
        (base / name).mkdir()
        keys[name] = subprocess.run(
            [str(rhio_bin().with_name("rhio-client")), "keygen", "--out", str(base / name / "private.key")],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        ports[name] = (free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM))
    for name, cluster, other in (("a", a, "b"), ("b", b, "a")):
        routes = (
            '[[publish]]\nsubjects = ["news.>"]\nstream = "NEWS_OUT"\n'
            f'[mirror]\nenabled = true\nregistry = "{env["registry"]}"\nproject = "rhio"\n'
            if name == "a"
            else f'[[subscribe]]\npublic_key = "{keys["a"]}"\nsubjects = ["news.>"]\nstream = "NEWS_IN"\n'
            f'[[subscribe]]\npublic_key = "{keys["a"]}"\nsubjects = ["datasets.>"]\nstream = "DATASETS"\n'
        )
        config = f"""
[node]
data_dir = "{base / name}"
log_level = "info"
[http]
bind = "127.0.0.1:{ports[name][0]}"
[nats]
endpoint = "{cluster.nats_url}"
create_streams = true
[s3]
endpoint = "{cluster.s3_endpoint}"
bucket = "{cluster.s3_bucket}"
access_key = "{cluster.s3_access_key}"
secret_key = "{cluster.s3_secret_key}"
[import]
roots = ["{data}"]
[network]
network_id = "rhio-python-test"
bind_ip = "127.0.0.1"
bind_port = {ports[name][1]}
probe_interval_secs = 1
[[network.known_nodes]]
public_key = "{keys[other]}"
addresses = ["127.0.0.1:{ports[other][1]}"]
{routes}"""
        (base / name / "config.toml").write_text(config)
        log = open(base / name / "node.log", "wb")
        procs.append(subprocess.Popen(
            [str(rhio_bin()), "-c", str(base / name / "config.toml")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        ))
    for name in ("a", "b"):
        wait_for(f"node {name} connected",
                 lambda: (health(ports[name][0]) or {}).get("peers", {}).get("connected") == 1)
    yield {"a": a, "b": b, "keys": keys, "data": data, "base": base, "ports": ports,
           "registry": env["registry"]}
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    subprocess.run(["python3", str(ROOT / "dev/localenv.py"), "down", "--dir", str(base / "env")],
                   capture_output=True)
    tmp.cleanup()


def client_of(cluster):
    return rhio_client.Client(
        cluster.nats_url,
        s3_endpoint=cluster.s3_endpoint,
        s3_bucket=cluster.s3_bucket,
        s3_access_key=cluster.s3_access_key,
        s3_secret_key=cluster.s3_secret_key,
    )


@pytest.fixture(scope="module")
def weather(clusters):
    """A pyarrow file imported in A and replicated into B."""
    path = clusters["data"] / "weather.parquet"
    table = pa.table({
        "station": pa.array([f"s{i % 17}" for i in range(20_000)]),
        "temperature": pa.array([i * 0.01 for i in range(20_000)], type=pa.float64()),
        "hour": pa.array(range(20_000), type=pa.int64()),
    })
    pq.write_table(table, path, row_group_size=4_000)
    answer = client_of(clusters["a"]).import_file(str(path), dataset="weather")
    assert answer["ok"] is True and answer["version"] == 0
    b = client_of(clusters["b"])
    wait_for("the replica in B", lambda: b.datasets())
    return path


def test_datasets_fetch_and_read_dataset_after_replication(clusters, weather):
    b = client_of(clusters["b"])
    [version] = b.datasets()
    assert version.dataset == "weather" and version.version == 0
    assert version.author == clusters["keys"]["a"]
    assert version.verified and version.row_groups == 5
    assert clusters["keys"]["a"] in version.location

    out = clusters["base"] / "fetched.parquet"
    summary = b.fetch("weather", out)
    assert out.read_bytes() == weather.read_bytes()
    assert summary["file_hash"] == version.file_hash

    table = b.read_dataset("weather")
    expected = pq.read_table(weather)
    assert table.schema == expected.schema
    assert table.num_rows == 20_000
    assert table.equals(expected)
    assert asyncio.run(b.read_dataset_async("weather", version=0)).equals(expected)


def test_errors_carry_the_node_and_client_codes(clusters, weather):
    b = client_of(clusters["b"])
    with pytest.raises(rhio_client.NotFoundError) as err:
        b.fetch("rain", clusters["base"] / "rain.parquet")
    assert err.value.code == "not_found"
    with pytest.raises(rhio_client.NotFoundError):
        b.read_dataset("weather", version=7)
    without_s3 = rhio_client.Client(clusters["b"].nats_url)
    with pytest.raises(rhio_client.UsageError) as err:
        without_s3.fetch("weather", clusters["base"] / "x.parquet")
    assert "no S3 credentials" in str(err.value)
    a = client_of(clusters["a"])
    with pytest.raises(rhio_client.RhioError) as err:
        a.import_file("/etc/hostname")
    assert err.value.code == "forbidden_path"
    with pytest.raises(rhio_client.ConnectError):
        rhio_client.Client("nats://127.0.0.1:1")


def test_subscribe_sees_verified_messages_from_the_other_cluster(clusters):
    b = client_of(clusters["b"])
    a = client_of(clusters["a"])
    with b.subscribe("news.>") as subscription:
        a.publish("news.eu", "it rains", headers={"Kind": "weather"})
        message = subscription.next(timeout=10)
        assert message is not None, "no routed message within 10 s"
        assert message.subject == "news.eu"
        assert message.payload == b"it rains"
        assert message.verified and message.author == clusters["keys"]["a"]
        assert ("Kind", "weather") in message.headers

        async def one():
            asyncio.get_running_loop()
            await a.publish_async("news.us", b"sunny")
            async for received in subscription:
                return received

        received = asyncio.run(asyncio.wait_for(one(), timeout=10))
        assert received.subject == "news.us" and received.verified and received.trusted
    # A routed message's provenance headers on other bytes: reported, not verified.
    with b.subscribe("news.>") as subscription:
        b.publish("news.eu", "forged text", headers=dict(message.headers))
        forged = subscription.next(timeout=10)
        assert forged is not None and forged.payload == b"forged text"
        assert not forged.verified and not forged.trusted and forged.error
    # Only some authors trusted: a verified message of another is not.
    with b.subscribe("news.>", trusted=["00" * 32]) as subscription:
        a.publish("news.eu", "again")
        message = subscription.next(timeout=10)
        assert message is not None and message.verified and not message.trusted
    # A local message without provenance is reported, not hidden.
    with a.subscribe("news.>") as local:
        a.publish("news.local", "hello")
        message = local.next(timeout=10)
        assert message is not None and not message.verified
        assert message.error


def test_a_tampered_object_fails_verification_and_leaves_no_file(clusters, weather):
    b = client_of(clusters["b"])
    [version] = b.datasets()
    key = version.location.removeprefix(f"s3://{clusters['b'].s3_bucket}/")
    # Through the S3 API, so the test runs on any S3 store (./dev/test-garage too).
    import boto3
    s3 = boto3.client("s3", endpoint_url=clusters["b"].s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=clusters["b"].s3_access_key,
                      aws_secret_access_key=clusters["b"].s3_secret_key)
    bucket = clusters["b"].s3_bucket
    original = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        changed = bytearray(original)
        changed[100] ^= 1
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(changed))
        target = clusters["base"] / "tampered"
        target.mkdir()
        with pytest.raises(rhio_client.VerificationError):
            b.read_dataset("weather")
        with pytest.raises(rhio_client.VerificationError):
            b.fetch("weather", target / "weather.parquet")
        assert list(target.iterdir()) == []
    finally:
        s3.put_object(Bucket=bucket, Key=key, Body=original)


def test_verify_a_file_against_the_signed_manifest_from_the_registry(clusters, weather, tmp_path):
    """A consumer that pulled the artifact A's mirror pushed checks the file without any node."""
    registry = clusters["registry"]
    wait_for("A's push", lambda: (health(clusters["ports"]["a"][0]) or {}).get("mirror", {}).get("pushed") == 1)
    request = urllib.request.Request(
        f"{registry}/v2/rhio/weather/manifests/v0",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request) as r:
        manifest = json.load(r)
    assert manifest["artifactType"] == "application/vnd.apache.parquet"
    files = {}
    for layer in manifest["layers"]:
        title = layer["annotations"]["org.opencontainers.image.title"]
        with urllib.request.urlopen(f"{registry}/v2/rhio/weather/blobs/{layer['digest']}") as r:
            (tmp_path / title).write_bytes(r.read())
        files[layer["mediaType"]] = tmp_path / title
    parquet = files["application/vnd.apache.parquet"]
    signed = files["application/vnd.rhio.signed-manifest.v1+cbor"]
    summary = rhio_client.verify(parquet, signed)
    assert summary["author"] == clusters["keys"]["a"] and summary["version"] == 0
    assert asyncio.run(rhio_client.verify_async(parquet, signed)) == summary
    assert pq.read_table(parquet).equals(pq.read_table(weather))
    with pytest.raises(rhio_client.VerificationError):
        rhio_client.verify(parquet, parquet)  # not a signed manifest
    changed = bytearray(parquet.read_bytes())
    changed[10] ^= 1
    parquet.write_bytes(bytes(changed))
    with pytest.raises(rhio_client.VerificationError):
        rhio_client.verify(parquet, signed)
    with pytest.raises(rhio_client.RhioError) as err:
        rhio_client.verify(parquet, tmp_path / "missing.rhio-manifest")
    assert err.value.code == "io"


def test_cluster_state_tables_have_the_documented_schemas(clusters, weather, tmp_path):
    for me, other in (("a", "b"), ("b", "a")):
        state = client_of(clusters[me]).cluster_state()
        assert sorted(state) == ["datasets", "peers", "transfers"]
        peers = state["peers"]
        assert peers.schema.names == [
            "public_key", "addresses", "state", "last_seen_secs_ago", "rtt_ms", "last_error"]
        assert peers.column("public_key").to_pylist() == [clusters["keys"][other]]
        assert peers.column("state").to_pylist() == ["connected"]
    state = asyncio.run(client_of(clusters["b"]).cluster_state_async())
    datasets = state["datasets"]
    assert datasets.schema.names == [
        "dataset", "author", "version", "rows", "bytes", "row_groups", "file_hash", "local",
        "location", "created", "verified"]
    assert str(datasets.schema.field("created").type) == "timestamp[us, tz=UTC]"
    row = datasets.to_pylist()[0]
    assert row["dataset"] == "weather" and row["rows"] == 20_000 and row["verified"]
    assert state["transfers"].schema.names == [
        "dataset", "author", "version", "bytes_done", "bytes_total", "bytes_fetched",
        "rate_mib_s", "parts_done", "parts_total", "peers"]
    # The CLI writes the same tables as Parquet files pyarrow reads.
    cli = rhio_bin().with_name("rhio-client")
    subprocess.run(
        [str(cli), "--nats", clusters["b"].nats_url, "state", "--format", "parquet",
         "--out", str(tmp_path)],
        check=True, capture_output=True,
    )
    assert pq.read_table(tmp_path / "datasets.parquet").equals(datasets)
    assert pq.read_table(tmp_path / "peers.parquet").num_rows == 1
