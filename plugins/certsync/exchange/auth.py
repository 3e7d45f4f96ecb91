"""App-only tokens for Exchange Online through msal (client secret or certificate)."""

from __future__ import annotations

import logging
from pathlib import Path

import msal
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from certsync.config import ExchangeSettings

log = logging.getLogger(__name__)
EXCHANGE_SCOPE = "https://outlook.office365.com/.default"


class AuthError(RuntimeError):
    """The token endpoint refused the configured application credentials."""


def http_session(settings: ExchangeSettings) -> requests.Session:
    """A session that trusts exactly the configured CA (or the system's) and ignores proxy/CA env vars."""
    session = requests.Session()
    # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE would otherwise override verify=.
    session.trust_env = False
    session.verify = settings.ca_file or True
    return session


def _credential(settings: ExchangeSettings) -> str | dict[str, str]:
    if settings.certificate_file and settings.private_key_file:
        cert_pem = Path(settings.certificate_file).read_bytes()
        key_pem = Path(settings.private_key_file).read_bytes()
        # Fail here, with the file named, rather than inside msal with a vague message.
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            serialization.load_pem_private_key(key_pem, password=None)
        except ValueError:
            raise AuthError(
                f"certificate_file {settings.certificate_file!r} or its private key is not valid PEM"
            ) from None
        return {
            "private_key": key_pem.decode(),
            "thumbprint": cert.fingerprint(hashes.SHA1()).hex(),  # noqa: S303 - x5t is SHA-1 by spec
            "public_certificate": cert_pem.decode(),
        }
    assert settings.client_secret is not None
    return settings.client_secret


class TokenProvider:
    """One msal application per process: it caches tokens and remembers token-endpoint throttling."""

    def __init__(self, *, settings: ExchangeSettings, session: requests.Session) -> None:
        # The resource is Exchange Online's, whatever host the calls go to.
        self._scope = EXCHANGE_SCOPE
        authority = f"{settings.authority_host.rstrip('/')}/{settings.tenant_id}"
        try:
            self._app = msal.ConfidentialClientApplication(
                settings.client_id,
                authority=authority,
                client_credential=_credential(settings),
                http_client=session,
                # Without this msal asks login.microsoftonline.com about any authority it does not know.
                instance_discovery=settings.authority_host.startswith("https://login.microsoftonline.com"),
            )
        except (requests.RequestException, ValueError) as exc:
            raise AuthError(f"authority {authority} is not usable: {type(exc).__name__}: {exc}") from None

    def token(self) -> str:
        result = self._app.acquire_token_for_client(scopes=[self._scope])
        if "access_token" not in result:
            # error_description carries no secret; the credential never leaves msal.
            raise AuthError(
                f"token request for client {self._app.client_id} failed: "
                f"{result.get('error')}: {(str(result.get('error_description', '')).splitlines() or [''])[0]}"
            )
        return result["access_token"]
