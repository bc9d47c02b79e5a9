"""Server TLS that follows its certificate files: replace them and new connections get the new
certificate, with no restart.

Certificates are short-lived (90 days from ACME CAs, hours from some internal ones), and
restarting an edge server breaks every device's stream (they resume, at a cost). gRPC asks
before each handshake whether the configuration changed; it has when a file's inode, size or
modification time did. A set that does not load (mid-rotation: a new certificate beside the old
key, a half-written file) is skipped with one warning and the last good set serves on, so a
rotation never takes the server off the air; the next change is tried again.
"""
from __future__ import annotations

import logging
import os
import ssl

import grpc

from shared.tls import pem_bytes, read_pem

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int] | None, ...]


class CertificateFiles:
    """--tls-cert, --tls-key and, for mutual TLS, --tls-client-ca."""

    def __init__(self, cert: str, key: str, client_ca: str | None = None):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._served = self._skipped = self._stamp()
        for path, flag in ((cert, "--tls-cert"), (key, "--tls-key"), (client_ca, "--tls-client-ca")):
            if path:
                read_pem(path, flag)  # a missing or non-PEM file: SystemExit naming the flag
        try:
            self.initial = self._load()
        except ssl.SSLError as err:
            raise SystemExit(f"--tls-cert {cert} and --tls-key {key} do not load together ({err.reason or err}); "
                             "the key must be the certificate's") from None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self.changed,
                                                   require_client_authentication=self.client_ca is not None)

    def changed(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question before each handshake: the new configuration, or None to keep serving
        the current one."""
        stamp = self._stamp()
        if stamp in (self._served, self._skipped):
            return None
        try:
            config = self._load()
        except (OSError, ValueError, ssl.SSLError) as err:
            self._skipped = stamp
            log.warning("the TLS files changed but do not load (%s); still serving the previous certificate", err)
            return None
        self._served = stamp
        log.info("the TLS files changed: new connections get the certificate now in %s", self.cert)
        return config

    def _paths(self) -> list[str]:
        return [p for p in (self.cert, self.key, self.client_ca) if p]

    def _stamp(self) -> Stamp:
        def one(path: str) -> tuple[int, int, int] | None:
            try:
                st = os.stat(path)
            except OSError:
                return None
            return st.st_ino, st.st_size, st.st_mtime_ns
        return tuple(one(p) for p in self._paths())

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC wants them, once OpenSSL has checked that the key is the certificate's
        (gRPC would only fail the handshakes)."""
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        check.load_cert_chain(self.cert, self.key, password=lambda: b"")  # gRPC reads no encrypted keys; never prompt
        if self.client_ca:
            check.load_verify_locations(cafile=self.client_ca)
        pair = (pem_bytes(self.key), pem_bytes(self.cert))
        ca = pem_bytes(self.client_ca) if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)
