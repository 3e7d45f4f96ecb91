"""The Entra ID side of the emulator: OpenID discovery, client-credentials tokens, token checks.

Access tokens are RS256 JWTs signed with a key kept in the emulator home, so tokens stay valid
across emulator restarts just as real tokens outlive a service hiccup.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from certsync_lab.emulator.errors import aadsts
from certsync_lab.emulator.state import RegisteredClient, StateStore
from certsync_lab.emulator.tls import private_key_pem, write_private_file

log = logging.getLogger(__name__)

EXCHANGE_RESOURCE = "https://outlook.office365.com"
EXCHANGE_SCOPE = f"{EXCHANGE_RESOURCE}/.default"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SIGNING_KEY_FILE = "token-signing-key.pem"
TOKEN_LIFETIME_S = 3599
# Entra tolerates a few minutes of clock skew on client assertions.
LEEWAY_S = 300


class TokenRejected(Exception):
    """An access token presented to InvokeCommand is missing, invalid or expired."""


@dataclass(frozen=True, kw_only=True)
class TokenResult:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AccessClaims:
    client_id: str
    tenant_id: str
    expires_at: int


class TokenService:
    def __init__(self, *, store: StateStore, home: Path) -> None:
        self._store = store
        self._key = _load_or_create_key(Path(home) / SIGNING_KEY_FILE)
        self._kid = _key_id(self._key.public_key())

    def knows_tenant(self, tenant: str) -> bool:
        return tenant.lower() in (self._store.tenant_id.lower(), self._store.tenant_domain.lower())

    def openid_configuration(self, *, base_url: str, tenant: str) -> dict[str, Any]:
        root = f"{base_url.rstrip('/')}/{tenant}"
        tenant_id = self._store.tenant_id
        return {
            "issuer": f"{base_url.rstrip('/')}/{tenant_id}/v2.0",
            "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
            "token_endpoint": f"{root}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
            "jwks_uri": f"{base_url.rstrip('/')}/{tenant}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "token id_token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "tenant_region_scope": "EU",
        }

    def jwks(self) -> dict[str, Any]:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        jwk.update({"kid": self._kid, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    def issue(self, *, tenant: str, form: Mapping[str, str], token_url: str) -> TokenResult:
        """Answer a token request (client credentials only) the way Entra ID does."""
        if not self.knows_tenant(tenant):
            return _error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            return _error(
                400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type."
            )
        client_id = form.get("client_id", "")
        client = self._store.get_client(client_id)
        if client is None:
            return _error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory"
                f" '{self._store.tenant_domain}'.",
            )
        failure = self._authenticate(client=client, form=form, token_url=token_url)
        if failure is not None:
            return failure
        if not _exchange_scope(form.get("scope", ""), token_url=token_url, tenant=tenant):
            return _error(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {form.get('scope', '')} is not valid. Client"
                " credential flows must have a scope value with /.default suffixed to the"
                " resource identifier (application ID URI).",
            )
        return TokenResult(status=200, body=self._token_body(client_id=client_id))

    def _authenticate(
        self, *, client: RegisteredClient, form: Mapping[str, str], token_url: str
    ) -> TokenResult | None:
        if "client_assertion" in form:
            if form.get("client_assertion_type") != ASSERTION_TYPE:
                return _error(400, "invalid_request", 700023, "Invalid client assertion type.")
            return self._check_assertion(
                client=client, assertion=form["client_assertion"], token_url=token_url
            )
        if "client_secret" in form:
            if client.secret_matches(form["client_secret"]):
                return None
            log.info("token refused: wrong client secret for client %s", client.client_id)
            return _error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is"
                " the client secret value, not the client secret ID, for a secret added to app"
                f" '{client.client_id}'.",
            )
        return _error(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        )

    def _check_assertion(
        self, *, client: RegisteredClient, assertion: str, token_url: str
    ) -> TokenResult | None:
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return _error(401, "invalid_client", 50027, "JWT token is invalid or malformed.")
        certificate = _registered_certificate(client)
        if certificate is None or not _thumbprint_matches(header, certificate):
            return _error(
                401,
                "invalid_client",
                700027,
                "The certificate with identifier used to sign the client assertion is not"
                f" registered on application. [Reason - The key was not found., Thumbprint of key"
                f" used by client: '{header.get('x5t', header.get('x5t#S256', ''))}']",
            )
        return self._verify_assertion_claims(
            client=client, assertion=assertion, certificate=certificate, token_url=token_url
        )

    def _verify_assertion_claims(
        self,
        *,
        client: RegisteredClient,
        assertion: str,
        certificate: x509.Certificate,
        token_url: str,
    ) -> TokenResult | None:
        try:
            claims = jwt.decode(
                assertion,
                key=certificate.public_key(),  # type: ignore[arg-type]
                algorithms=["RS256", "PS256"],
                audience=token_url,
                issuer=client.client_id,
                leeway=LEEWAY_S,
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except jwt.InvalidSignatureError:
            log.info("token refused: bad assertion signature for client %s", client.client_id)
            return _error(401, "invalid_client", 700027, "Client assertion failed signature validation.")
        except jwt.ExpiredSignatureError:
            return _error(
                401, "invalid_client", 700024, "Client assertion is not within its valid time range."
            )
        except (
            jwt.InvalidAudienceError,
            jwt.InvalidIssuerError,
            jwt.MissingRequiredClaimError,
            jwt.PyJWTError,
        ) as exc:
            return _error(401, "invalid_client", 700021, f"Client assertion is invalid: {exc}.")
        if claims.get("sub") != client.client_id:
            return _error(
                401,
                "invalid_client",
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.",
            )
        return None

    def _token_body(self, *, client_id: str) -> dict[str, Any]:
        now = int(time.time())
        tenant_id = self._store.tenant_id
        claims = {
            "aud": EXCHANGE_RESOURCE,
            "iss": f"https://sts.windows.net/{tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_LIFETIME_S,
            "appid": client_id,
            "tid": tenant_id,
            "roles": ["Exchange.ManageAsApp"],
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"app:{client_id}")),
            "uti": uuid.uuid4().hex,
        }
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self._kid})
        return {
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME_S,
            "ext_expires_in": TOKEN_LIFETIME_S,
            "access_token": token,
        }

    def verify_access_token(self, *, authorization: str | None, tenant: str) -> AccessClaims:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise TokenRejected("no bearer token")
        try:
            claims = jwt.decode(
                authorization[7:].strip(),
                key=self._key.public_key(),
                algorithms=["RS256"],
                audience=EXCHANGE_RESOURCE,
                options={"require": ["exp", "tid", "appid"]},
            )
        except jwt.PyJWTError as exc:
            raise TokenRejected(type(exc).__name__) from None
        if not self.knows_tenant(tenant) or claims["tid"] != self._store.tenant_id:
            raise TokenRejected("token issued for another tenant")
        return AccessClaims(client_id=claims["appid"], tenant_id=claims["tid"], expires_at=int(claims["exp"]))


def _exchange_scope(scope: str, *, token_url: str, tenant: str) -> bool:
    """Exchange Online's resource scope; the emulator's own URL stands in for it as well."""
    own_base = token_url[: token_url.index(f"/{tenant}/oauth2/")]
    return bool({EXCHANGE_SCOPE, f"{own_base}/.default"} & set(scope.split()))


def _error(status: int, error: str, code: int, description: str) -> TokenResult:
    status, body = aadsts(status=status, error=error, code=code, description=description)
    return TokenResult(status=status, body=body)


def _registered_certificate(client: RegisteredClient) -> x509.Certificate | None:
    if client.certificate_pem is None:
        return None
    return x509.load_pem_x509_certificate(client.certificate_pem.encode())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _thumbprint_matches(header: Mapping[str, Any], certificate: x509.Certificate) -> bool:
    der = certificate.public_bytes(serialization.Encoding.DER)
    # msal pads its base64url thumbprints, RFC 7515 says no padding: accept both, as Entra does.
    if "x5t#S256" in header:
        return str(header["x5t#S256"]).rstrip("=") == _b64url(hashlib.sha256(der).digest())
    if "x5t" in header:
        sha1 = hashlib.sha1(der).digest()  # noqa: S324 - x5t is defined as SHA-1
        return str(header["x5t"]).rstrip("=") == _b64url(sha1)
    return False


def _key_id(public_key: rsa.RSAPublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _b64url(hashlib.sha256(der).digest()[:16])


def _load_or_create_key(path: Path) -> rsa.RSAPrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the emulator token signing key must be an RSA key")
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_private_file(path, private_key_pem(key))
    return key
