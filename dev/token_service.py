#!/usr/bin/env python3
"""A small token service for a local CNCF Distribution registry, as Harbor's `/service/token` works.

The registry (`auth: token:`) answers an unauthenticated request with 401 and
`Www-Authenticate: Bearer realm=<this>/service/token,service=harbor-registry,scope=...`; a client
then sends `GET /service/token?service=..&scope=repository:<repo>:pull,push` with HTTP basic
credentials and gets `{"token": <RS256 JWT>, "expires_in": ..}` whose `access` claim grants the
requested actions. Wrong credentials get 401; no credentials get a token without access (what
Harbor gives anonymous users of a private project).

    token_service.py --port P --key key.pem --cert cert.pem --users users.json [--ttl 300]
    token_service.py keygen --key key.pem --cert cert.pem     # RSA key + self-signed certificate

`users.json` maps user names to passwords (robot accounts such as `robot$rhio+ci` included).
Every answer is logged on stdout as one JSON line (user, scope, status), so tests can count them.
"""

import argparse
import base64
import datetime
import json
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

ISSUER = "rhio-dev-token-issuer"
SERVICE = "harbor-registry"


def keygen(key_path, cert_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def parse_scope(scope):
    """`repository:<name>:pull,push` -> access entry (names may contain ':' only before actions)."""
    kind, rest = scope.split(":", 1)
    name, actions = rest.rsplit(":", 1)
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


def serve(args):
    with open(args.key, "rb") as f:
        key = f.read()
    with open(args.cert, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
    with open(args.users) as f:
        users = json.load(f)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def answer(self, status, body, user, scopes):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            print(json.dumps({"status": status, "user": user, "scopes": scopes}), flush=True)

        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/health":
                return self.answer(200, {"ok": True}, None, [])
            if url.path != "/service/token":
                return self.answer(404, {"error": "not found"}, None, [])
            query = parse_qs(url.query)
            scopes = query.get("scope", [])
            user = None
            header = self.headers.get("Authorization", "")
            if header.startswith("Basic "):
                try:
                    user, password = base64.b64decode(header[6:]).decode().split(":", 1)
                except (ValueError, UnicodeDecodeError):
                    return self.answer(400, {"error": "bad basic credentials"}, None, scopes)
                if users.get(user) != password:
                    return self.answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "invalid credentials"}]}, user, scopes)
            access = [parse_scope(s) for s in scopes] if user else []
            now = int(time.time())
            claims = {
                "iss": ISSUER,
                "sub": user or "",
                "aud": query.get("service", [SERVICE])[0],
                "iat": now,
                "nbf": now - 5,
                "exp": now + args.ttl,
                "jti": uuid.uuid4().hex,
                "access": access,
            }
            token = jwt.encode(claims, key, algorithm="RS256", headers={"x5c": x5c})
            self.answer(
                200,
                {"token": token, "access_token": token, "expires_in": args.ttl,
                 "issued_at": datetime.datetime.now(datetime.timezone.utc).isoformat()},
                user,
                scopes,
            )

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "keygen":
        parser = argparse.ArgumentParser()
        parser.add_argument("keygen")
        parser.add_argument("--key", required=True)
        parser.add_argument("--cert", required=True)
        args = parser.parse_args()
        return keygen(args.key, args.cert)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--users", required=True)
    parser.add_argument("--ttl", type=int, default=300)
    serve(parser.parse_args())


if __name__ == "__main__":
    main()
