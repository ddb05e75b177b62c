"""The gRPC client behind `captioner caption --url` (`captioner.serving.client`) over TLS:
mutual TLS works; plaintext, an impostor server and a missing client certificate are refused."""
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import jpeg_bytes

ENV = {**os.environ}


def _pki(d: Path) -> dict:
    """A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, and an
    impostor CA + server certificate for the same address (what a man in the middle presents)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(cn, key, issuer_cn, issuer_key, ca=False, san=False):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            import ipaddress

            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                             x509.DNSName("localhost")]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    out = {}

    def save(name, obj):
        p = d / name
        if isinstance(obj, x509.Certificate):
            p.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        else:
            p.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
        out[name] = p
    for tag in ("", "evil-"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        save(f"{tag}ca.pem", cert(f"{tag}ca", ca_key, f"{tag}ca", ca_key, ca=True))
        srv_key = ec.generate_private_key(ec.SECP256R1())
        save(f"{tag}server.key", srv_key)
        save(f"{tag}server.pem", cert("127.0.0.1", srv_key, f"{tag}ca", ca_key, san=True))
        if not tag:
            cli_key = ec.generate_private_key(ec.SECP256R1())
            save("client.key", cli_key)
            save("client.pem", cert("captioner-client", cli_key, "ca", ca_key))
    return out


def _tls_server(pki: dict, tag: str = ""):
    """gRPC server speaking the KServe v2 / Triton protocol over mutual TLS, as Triton does with
    --grpc-use-ssl-mutual (server docs/customization_guide/inference_protocols.md, "SSL/TLS":
    server cert + key, root cert that client certificates must chain to). Its one model answers
    each image with its byte count, enough to show the request crossed the channel intact."""
    from concurrent import futures

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from captioner.core.names import CAPTION

    class Echo(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):  # `caption --url` checks liveness once before any image
            return service_pb2.ServerLiveResponse(live=True)

        def ServerReady(self, request, context):
            return service_pb2.ServerReadyResponse(ready=True)

        def ModelInfer(self, request, context):
            raw = request.raw_input_contents[0]
            sizes, i = [], 0
            while i < len(raw):
                n = struct.unpack_from("<I", raw, i)[0]
                sizes.append(n)
                i += 4 + n
            caps = [f"{n} bytes over tls".encode() for n in sizes]
            resp = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
            o = resp.outputs.add(name=CAPTION, datatype="BYTES", shape=[len(caps), 1])
            assert o.name == CAPTION
            resp.raw_output_contents.append(b"".join(struct.pack("<I", len(c)) + c for c in caps))
            return resp

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    creds = grpc.ssl_server_credentials([(pki[f"{tag}server.key"].read_bytes(), pki[f"{tag}server.pem"].read_bytes())],
                                        root_certificates=pki["ca.pem"].read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("case", ["mutual-tls", "no-ssl-flag", "impostor-server", "no-client-cert"])
def test_caption_url_over_tls(tmp_path, case):
    pki = _pki(tmp_path)
    server, url = _tls_server(pki, "evil-" if case == "impostor-server" else "")
    img = tmp_path / "x.jpg"
    img.write_bytes(jpeg_bytes())
    tls = ["--ssl", "--root-certificates", str(pki["ca.pem"])]
    client = ["--private-key", str(pki["client.key"]), "--certificate-chain", str(pki["client.pem"])]
    args = {"mutual-tls": tls + client, "no-ssl-flag": [], "impostor-server": tls + client,
            "no-client-cert": tls}[case]
    try:
        r = subprocess.run([sys.executable, "-m", "captioner", "caption", str(img), "--url", url, *args],
                           env=ENV, capture_output=True, text=True, timeout=120)
    finally:
        server.stop(0)
    if case == "mutual-tls":
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{img}\t{img.stat().st_size} bytes over tls"
    else:  # plaintext to a TLS port, a certificate from another CA, no client certificate: refused
        # refused at the one liveness call, as one line naming the server (not one error per image)
        assert r.returncode != 0 and "bytes over tls" not in r.stdout, r.stderr
        assert r.stderr.count(f"cannot reach the model server at {url}") == 1, r.stderr
