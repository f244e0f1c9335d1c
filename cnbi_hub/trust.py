"""Which CA bundle this machine trusts: builds, resolving and servers use the same one.

A hub behind a TLS-intercepting proxy or a private package mirror has its CA in the machine's
trust store (or in $PIP_CERT / $SSL_CERT_FILE); whatever reaches a package index from here —
uv resolving, a build, `pip install` in a user's server — must trust it too.
"""

from __future__ import annotations

import os
import ssl


def machine_ca_bundle() -> str:
    """Path of the PEM bundle to trust: $PIP_CERT, else $SSL_CERT_FILE, else OpenSSL's default
    file (Debian's /etc/ssl/certs/ca-certificates.crt); "" when there is none."""
    paths = ssl.get_default_verify_paths()
    for candidate in (
        os.environ.get("PIP_CERT", ""),
        os.environ.get("SSL_CERT_FILE", ""),
        paths.cafile or "",
        paths.openssl_cafile or "",
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and os.path.isfile(candidate):
            return candidate
    return ""
