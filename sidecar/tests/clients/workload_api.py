"""A real SPIFFE Workload API client for the sidecar's tests: PyPI's `spiffe` (python-spiffe),
run from the virtual environment `make deps` makes (.venv, sidecar/tests/clients/requirements.txt).
The socket comes from SPIFFE_ENDPOINT_SOCKET=unix:///path, as for any app. Each command prints
one result line per event and exits 0, or prints what went wrong and exits 1.

  workload_api.py svid-renewal SPIFFE_ID     the SVID, then its renewal on the same stream
  workload_api.py bundles TRUST_DOMAIN ROOTS_PEM   FetchX509Bundles against the roots file
  workload_api.py no-header                  FetchX509SVID without the security header, then with
  workload_api.py jwt                        FetchJWTSVID (with the header): Unimplemented
  workload_api.py until-closed               reads a stream until the server ends it
  workload_api.py bundles-stream TRUST_DOMAIN   each FetchX509Bundles update: its root count
"""
import os
import queue
import sys

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from spiffe import WorkloadApiClient
from spiffe.bundle.x509_bundle.x509_bundle import X509Bundle
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.spiffe_id.spiffe_id import TrustDomain

TIMEOUT = 30


def fail(message):
    print(message, flush=True)
    sys.exit(1)


def public_der(key):
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def check_svid(context, want_id):
    """The SVID names want_id, its key is the certificate's, and its chain verifies to a root of
    the bundle of its trust domain. Returns the leaf's serial."""
    svid = context.default_svid
    if str(svid.spiffe_id) != want_id:
        fail(f"spiffe id {svid.spiffe_id}, want {want_id}")
    leaf = svid.leaf
    if public_der(svid.private_key.public_key()) != public_der(leaf.public_key()):
        fail("the private key does not match the certificate")
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    if bundle is None:
        fail(f"no bundle for {svid.spiffe_id.trust_domain}")
    chain = svid.cert_chain
    for child, parent in zip(chain, chain[1:]):
        child.verify_directly_issued_by(parent)
    roots = [r for r in bundle.x509_authorities if r.subject == chain[-1].issuer]
    for root in roots:
        try:
            chain[-1].verify_directly_issued_by(root)
            return leaf.serial_number
        except Exception:
            continue
    fail("the chain does not verify against the bundle")


def svid_renewal(want_id):
    client = WorkloadApiClient()
    events = queue.Queue()
    # retry_connect=False: a second update can only come on the first stream.
    handle = client.stream_x509_contexts(
        on_success=lambda ctx: events.put(("ok", ctx)),
        on_error=lambda err: events.put(("error", err)),
        retry_connect=False,
    )
    serials = []
    while len(serials) < 2:
        try:
            kind, value = events.get(timeout=TIMEOUT)
        except queue.Empty:
            fail(f"no update within {TIMEOUT}s after {len(serials)}")
        if kind == "error":
            fail(f"stream error after {len(serials)} updates: {value}")
        serial = check_svid(value, want_id)
        if serials and serial == serials[-1]:
            continue
        serials.append(serial)
        print(f"svid {want_id} serial {serial:x}", flush=True)
    handle.cancel()
    client.close()
    print("renewed on the same stream", flush=True)


def bundles(trust_domain, roots_pem):
    with open(roots_pem, "rb") as f:
        want = {c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(f.read())}
    with WorkloadApiClient() as client:
        bundle_set = client.fetch_x509_bundles(timeout=TIMEOUT)
    bundle = bundle_set.get_bundle_for_trust_domain(TrustDomain(trust_domain))
    if bundle is None:
        fail(f"no bundle for {trust_domain}")
    got = {c.public_bytes(Encoding.DER) for c in bundle.x509_authorities}
    if got != want:
        fail(f"bundle of {trust_domain}: {len(got)} roots, not those of {roots_pem}")
    print(f"bundle {trust_domain} roots {len(got)}", flush=True)


def raw_stub():
    path = os.environ["SPIFFE_ENDPOINT_SOCKET"].removeprefix("unix://")
    channel = grpc.insecure_channel(f"unix:{path}")
    return channel, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


def no_header():
    channel, stub = raw_stub()
    try:
        next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=TIMEOUT))
        fail("answered without the security header")
    except grpc.RpcError as err:
        print(f"refused {err.code().name}: {err.details()}", flush=True)
    # The same connection again, with the header: its :authority is now a reference into the
    # HPACK dynamic table that the first request filled.
    header = [("workload.spiffe.io", "true")]
    stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=header, timeout=TIMEOUT)
    next(stream)
    stream.cancel()
    print("then answered with the header", flush=True)
    channel.close()


def jwt():
    channel, stub = raw_stub()
    header = [("workload.spiffe.io", "true")]
    try:
        stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=header, timeout=TIMEOUT)
        fail("FetchJWTSVID answered")
    except grpc.RpcError as err:
        print(f"refused {err.code().name}", flush=True)
    channel.close()


def until_closed():
    channel, stub = raw_stub()
    header = [("workload.spiffe.io", "true")]
    stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=header)
    try:
        for _ in stream:
            print("update", flush=True)
        print("ended OK", flush=True)
    except grpc.RpcError as err:
        print(f"ended {err.code().name}", flush=True)
    channel.close()


def bundles_stream(trust_domain):
    channel, stub = raw_stub()
    header = [("workload.spiffe.io", "true")]
    td = TrustDomain(trust_domain)
    try:
        for response in stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=header):
            raw = response.bundles.get(f"spiffe://{trust_domain}")
            if raw is None:
                fail(f"no bundle for {trust_domain} in {list(response.bundles)}")
            print(f"roots {len(X509Bundle.parse_raw(td, raw).x509_authorities)}", flush=True)
    except grpc.RpcError as err:
        print(f"ended {err.code().name}", flush=True)
    channel.close()


def main(argv):
    commands = {
        "svid-renewal": svid_renewal,
        "bundles": bundles,
        "no-header": no_header,
        "jwt": jwt,
        "until-closed": until_closed,
        "bundles-stream": bundles_stream,
    }
    if len(argv) < 2 or argv[1] not in commands:
        fail(__doc__)
    commands[argv[1]](*argv[2:])


if __name__ == "__main__":
    main(sys.argv)
