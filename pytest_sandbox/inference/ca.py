"""The per-session interception CA: the leaf the interceptor presents for ``inference.local``.

Its own module because two sides use it: the interceptor (server contexts) and the fixtures that hand
the sandboxed child a bundle and the environment variables that make it trusted (network.md §4).
"""

from __future__ import annotations

import ssl
import threading
from pathlib import Path

import trustme

__all__ = ["InterceptionCA"]


class InterceptionCA:
    """The per-session CA whose leaves the interceptor presents for ``inference.local``.

    A fresh trustme CA per session (like OpenShell's ephemeral "OpenShell Sandbox CA"): nothing the
    sandboxed child trusts outlives the session, and no test needs the system trust store.
    """

    def __init__(self, ca: trustme.CA) -> None:
        self.ca = ca
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    @classmethod
    def create(cls) -> InterceptionCA:
        """A new CA with a fresh key."""
        return cls(trustme.CA(organization_name="pytest-sandbox", organization_unit_name="interception CA"))

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM."""
        return self.ca.cert_pem.bytes()

    def write_bundle(self, directory: Path) -> Path:
        """Write the CA certificate to ``directory`` and return the path (for ``SSL_CERT_FILE`` etc.).

        The bundle holds *only* this CA: the lab has no route to public origins, so trusting the
        system roots as well would only widen what a child could be fooled by.
        """
        path = Path(directory) / "pytest-sandbox-interception-ca.pem"
        self.ca.cert_pem.write_to_path(str(path))
        return path

    @staticmethod
    def env(bundle_path: Path | str) -> dict[str, str]:
        """Environment variables that make common TLS clients trust ``bundle_path``.

        The four variables OpenShell sets for its child (network.md §4): OpenSSL-based clients and
        Python ``ssl``, requests, curl, and Node.js (which *adds* to its built-in roots).
        """
        value = str(bundle_path)
        return {
            "SSL_CERT_FILE": value,
            "REQUESTS_CA_BUNDLE": value,
            "CURL_CA_BUNDLE": value,
            "NODE_EXTRA_CA_CERTS": value,
        }

    def server_context(self, hostname: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a leaf for ``hostname``; one per name, cached."""
        with self._lock:
            context = self._contexts.get(hostname)
            if context is None:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                # OpenShell terminates with ALPN http/1.1; h2 is never offered.
                context.set_alpn_protocols(["http/1.1"])
                self.ca.issue_cert(hostname).configure_cert(context)
                self._contexts[hostname] = context
            return context
