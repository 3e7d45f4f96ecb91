"""App-only tokens for Exchange Online through msal (client secret or certificate)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import msal
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from msal.exceptions import MsalServiceError

from certsync.config import ExchangeSettings
from certsync.exchange.errors import ExchangeError

log = logging.getLogger(__name__)
EXCHANGE_SCOPE = "https://outlook.office365.com/.default"


class AuthError(RuntimeError):
    """The token endpoint refused the configured application credentials."""


class TokenUnavailable(ExchangeError):
    """The token endpoint stayed down or busy through every attempt (retry later)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503, code="TokenEndpointUnavailable")


# Entra ID answers that say "not now" rather than "no": temporarily_unavailable, server errors,
# throttling (msal remembers a 429 and answers from its throttle cache until Retry-After passes).
TRANSIENT_TOKEN_ERRORS = frozenset({"temporarily_unavailable", "server_error", "request_timeout"})
TRANSIENT_AADSTS = ("AADSTS90033",)  # "a transient error has occurred"
TOKEN_ATTEMPTS = 4


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
        self._attempts = TOKEN_ATTEMPTS
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

    def token(self, *, refresh: bool = False) -> str:
        """An access token (msal's cached one unless `refresh`). A token endpoint that is down or
        busy is asked again with backoff, each wait logged; a refusal of the credentials fails at once."""
        if refresh:
            self._forget_tokens()
        for attempt in range(1, self._attempts + 1):
            result, why = self._acquire()
            if result is not None:
                return result
            if attempt == self._attempts:
                raise TokenUnavailable(f"token endpoint unavailable after {attempt} attempts: {why}")
            wait = min(2.0**attempt, 30.0)
            log.warning(
                "token endpoint: %s; asking again in %.0fs (attempt %d of %d)",
                why,
                wait,
                attempt,
                self._attempts,
            )
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _acquire(self) -> tuple[str | None, str]:
        """(token, "") or (None, why the endpoint failed for now); raises AuthError on a refusal."""
        try:
            result = self._app.acquire_token_for_client(scopes=[self._scope])
        except (requests.RequestException, MsalServiceError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        if "access_token" in result:
            return result["access_token"], ""
        error = str(result.get("error", ""))
        # error_description carries no secret; the credential never leaves msal.
        description = (str(result.get("error_description", "")).splitlines() or [""])[0]
        if error in TRANSIENT_TOKEN_ERRORS or any(code in description for code in TRANSIENT_AADSTS):
            return None, f"{error}: {description[:200]}"
        raise AuthError(f"token request for client {self._app.client_id} failed: {error}: {description}")

    def _forget_tokens(self) -> None:
        """Drop cached access tokens, so the next call asks the endpoint (after a 401)."""
        cache = self._app.token_cache
        for entry in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
            cache.remove_at(entry)
