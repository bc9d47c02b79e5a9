"""TLS between device and edge: the real server and device-client with certificates from a
throw-away CA (trustme), on loopback. The answer over TLS is the target's own greedy text; a
device without the right certificate, or without TLS, is told what to add."""
import json
import shutil
import subprocess
import sys

import pytest

from edge_server.launcher import ServerProcess

from conftest import PROMPTS, ROOT, Served

MAX_NEW = 12


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    import trustme

    folder = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    server, device = ca.issue_cert("localhost", "127.0.0.1"), ca.issue_cert("device-1")
    files = {"ca": ca.cert_pem, "stranger_ca": stranger.cert_pem,
             "server_cert": server.cert_chain_pems[0], "server_key": server.private_key_pem,
             "device_cert": device.cert_chain_pems[0], "device_key": device.private_key_pem}
    for name, blob in files.items():
        blob.write_to_path(str(folder / f"{name}.pem"))
    return {name: str(folder / f"{name}.pem") for name in files}


def _server(pki, *extra):
    return ServerProcess(["--log-level", "WARNING", "--dtype", "float32", "--threads", "1",
                          "--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"], *extra])


def _device(address, *flags):
    return subprocess.run([sys.executable, "-m", "device_client.cli", "--server", address, "--json",
                           "--max-new-tokens", str(MAX_NEW), "--drafter", "ngram", *flags, PROMPTS[1]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _exact(proc, loaded) -> None:
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["token_ids"] == Served(loaded, "float32").greedy(record["prompt_token_ids"], MAX_NEW)


def test_a_device_trusting_the_servers_ca_gets_the_exact_answer_over_tls(pki, loaded):
    with _server(pki) as srv:
        assert "(TLS)" in "".join(srv.log)
        _exact(_device(srv.address, "--tls-ca", pki["ca"]), loaded)
        plain = _device(srv.address)
        assert plain.returncode != 0
        assert f"no edge server answered at {srv.address}" in plain.stderr
        assert "add --tls-ca with its CA certificate" in plain.stderr
        wrong = _device(srv.address, "--tls-ca", pki["stranger_ca"])
        assert wrong.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in wrong.stderr
        assert "--tls-ca must hold the CA that signed its certificate" in wrong.stderr


def test_mutual_tls_admits_only_devices_with_a_certificate_from_its_ca(pki, loaded):
    with _server(pki, "--tls-client-ca", pki["ca"]) as srv:
        _exact(_device(srv.address, "--tls-ca", pki["ca"], "--tls-cert", pki["device_cert"],
                       "--tls-key", pki["device_key"]), loaded)
        anonymous = _device(srv.address, "--tls-ca", pki["ca"])
        assert anonymous.returncode != 0 and "wants --tls-cert and --tls-key" in anonymous.stderr


def test_renewed_certificate_files_serve_new_connections_without_a_restart(pki, tmp_path, loaded):
    """The files are replaced by a certificate from another CA: devices trusting the new CA get
    in and those trusting only the old no longer do. Half done (the new certificate beside the
    old key) the renewal is skipped and the old certificate serves on."""
    import trustme

    cert, key, new_ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "new_ca.pem"
    shutil.copy(pki["server_cert"], cert)
    shutil.copy(pki["server_key"], key)
    new_ca = trustme.CA()
    new_ca.cert_pem.write_to_path(str(new_ca_file))
    renewed = new_ca.issue_cert("localhost", "127.0.0.1")
    with ServerProcess(["--log-level", "INFO", "--dtype", "float32", "--threads", "1",
                        "--tls-cert", str(cert), "--tls-key", str(key)]) as srv:
        renewed.cert_chain_pems[0].write_to_path(str(cert))  # the key is not renewed yet
        _exact(_device(srv.address, "--tls-ca", pki["ca"]), loaded)
        assert "the TLS files changed but do not load" in "".join(srv.log)
        renewed.private_key_pem.write_to_path(str(key))
        _exact(_device(srv.address, "--tls-ca", str(new_ca_file)), loaded)
        old = _device(srv.address, "--tls-ca", pki["ca"])
        assert old.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in old.stderr
        assert "the TLS files changed: new connections get the certificate" in "".join(srv.log)


def test_a_key_that_is_not_the_certificates_is_refused_at_start(pki, tmp_path):
    import trustme

    other_key = tmp_path / "other.key"
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(other_key))
    proc = subprocess.run([sys.executable, "-m", "edge_server.cli", "--tls-cert", pki["server_cert"],
                           "--tls-key", str(other_key), "--port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "do not load together" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, says", [
    (["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
])
def test_server_tls_flags_that_cannot_work_are_refused(flags, says, capsys):
    from edge_server.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(flags)
    assert says in capsys.readouterr().err


def test_a_tls_file_that_is_missing_or_not_pem_is_named(tmp_path):
    from shared.tls import read_pem

    with pytest.raises(SystemExit, match="--tls-ca /no/such.pem: No such file or directory"):
        read_pem("/no/such.pem", "--tls-ca")
    (tmp_path / "key.txt").write_text("not a key")
    with pytest.raises(SystemExit, match="not a PEM file"):
        read_pem(str(tmp_path / "key.txt"), "--tls-key")


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("0.0.0.0", False), ("192.168.1.20", False), ("::", False)])
def test_plaintext_is_warned_about_beyond_loopback(host, loopback):
    from edge_server.cli import is_loopback

    assert is_loopback(host) is loopback
