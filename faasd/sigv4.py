"""AWS Signature Version 4: checking a signed request as AWS does, and signing one.

Standard library only, so that faasd's command-line client signs without
loading the daemon. The canonical request follows AWS's rules for every
service but S3 -- the path normalised and percent-encoded once more, the
query decoded and re-encoded, header values trimmed, the payload's SHA-256 --
so a request botocore signed verifies byte for byte. The date may be 5
minutes off, as AWS allows. Refusals carry AWS's error type and wording.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import hmac
from typing import Any, Mapping
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW = dt.timedelta(minutes=5)
AMZ_DATE = "%Y%m%dT%H%M%SZ"
SIGNATURE_MISMATCH = ("The request signature we calculated does not match the signature you "
                      "provided. Check your AWS Secret Access Key and signing method. Consult "
                      "the service documentation for details.")
INVALID_TOKEN = "The security token included in the request is invalid."


class AuthError(Exception):
    """A request's credentials are missing or wrong; `error_type` is AWS's name for it."""

    def __init__(self, error_type: str, message: str, status: int = 403) -> None:
        # A message may quote what the client sent: bytes that were not UTF-8
        # (kept by aiohttp as lone surrogates) become U+FFFD, so it encodes as JSON.
        message = _text(message)
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = status


def _bytes(text: str) -> bytes:
    """Text as the bytes it came as: aiohttp keeps bytes of a header that are not
    UTF-8 as lone surrogates, and a signature covers the bytes sent."""
    return text.encode("utf-8", "surrogateescape")


def _text(text: str) -> str:
    return _bytes(text).decode("utf-8", "replace")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 dot-segment removal, as botocore applies it before signing."""
    if not path:
        return ""
    output: list[str] = []
    for segment in path.split("/"):
        if segment and segment != ".":
            if segment == "..":
                if output:
                    output.pop()
            else:
                output.append(segment)
    first = "/" if path[0] == "/" else ""
    last = "/" if path[-1] == "/" and output else ""
    return first + "/".join(output) + last


def canonical_uri(raw_path: str) -> str:
    """The path as sent (still percent-encoded), normalised and encoded once more, as AWS
    does for every service but S3."""
    path = _remove_dot_segments(raw_path) or "/"
    return quote(path, safe="/~")


def canonical_query(raw_query: str) -> str:
    pairs = []
    for item in raw_query.split("&") if raw_query else []:
        if not item:
            continue
        key, _, value = item.partition("=")
        pairs.append((quote(unquote(key), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def _header_values(headers: Any, name: str) -> list[str] | None:
    values = headers.getall(name, None) if hasattr(headers, "getall") else (
        [headers[name]] if name in headers else None)
    return values


def canonical_request(method: str, raw_path: str, raw_query: str, headers: Any,
                      signed_headers: list[str], payload_hash: str) -> str:
    lines = []
    for name in signed_headers:
        values = _header_values(headers, name)
        if values is None:
            raise AuthError("InvalidSignatureException", SIGNATURE_MISMATCH)
        lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}")
    return "\n".join([method, canonical_uri(raw_path), canonical_query(raw_query),
                      "\n".join(lines) + "\n", ";".join(signed_headers), payload_hash])


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, _bytes(part), hashlib.sha256).digest()
    return key


def _string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    return "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(_bytes(canonical)).hexdigest()])


def _parse_authorization(header: str) -> dict[str, str]:
    algorithm, _, rest = header.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise AuthError("IncompleteSignatureException",
                        f"Unsupported AWS 'algorithm': '{algorithm}'. faasd accepts {ALGORITHM}.")
    params: dict[str, str] = {}
    for part in rest.split(","):
        key, sep, value = part.strip().partition("=")
        if sep:
            params[key.strip()] = value.strip()
    for required in ("Credential", "SignedHeaders", "Signature"):
        if required not in params:
            raise AuthError("IncompleteSignatureException",
                            f"Authorization header requires '{required}' parameter. "
                            f"Authorization={header[:200]}")
    return params


def signed_for(headers: Any, service: str) -> bool:
    """Whether the request carries a SigV4 Authorization scoped to `service`
    (`Credential=KEY/DATE/REGION/SERVICE/aws4_request`): what an AWS client
    sends, whether or not the signature holds."""
    header = headers.get("Authorization") or ""
    if not header.startswith(ALGORITHM + " "):
        return False
    try:
        params = _parse_authorization(header)
    except AuthError:
        return False
    scope = params["Credential"].split("/")
    return len(scope) == 5 and scope[3] == service


def _request_time(headers: Any) -> tuple[str, dt.datetime]:
    amz_date = headers.get("X-Amz-Date")
    if amz_date:
        try:
            when = dt.datetime.strptime(amz_date, AMZ_DATE).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            raise AuthError("IncompleteSignatureException",
                            f"Date must be in ISO-8601 'basic format'. Got '{amz_date[:40]}'. "
                            "See http://en.wikipedia.org/wiki/ISO_8601") from None
        return amz_date, when
    date = headers.get("Date")
    if date:
        try:
            when = email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError):
            when = None
        if when is not None and when.tzinfo is not None:
            when = when.astimezone(dt.timezone.utc)
            return when.strftime(AMZ_DATE), when
    raise AuthError("IncompleteSignatureException",
                    "Authorization header requires existence of either a 'X-Amz-Date' or a "
                    "'Date' header.")


def precheck_sigv4(raw_query: str, headers: Any, keys: Mapping[str, str], *, service: str,
                   now: dt.datetime | None = None) -> tuple[dict[str, str], list[str]]:
    """Everything about a SigV4 request that needs no body: the header's form, the
    date's skew, the scope and the key. Raises AuthError; proves nothing on success."""
    header = headers.get("Authorization")
    if not header:
        if "X-Amz-Signature" in raw_query:
            raise AuthError("IncompleteSignatureException",
                            "faasd accepts SigV4 in the Authorization header only, not in the query")
        raise AuthError("MissingAuthenticationTokenException", "Missing Authentication Token")
    params = _parse_authorization(header)
    scope_parts = params["Credential"].split("/")
    if len(scope_parts) != 5:
        raise AuthError("IncompleteSignatureException",
                        f"Credential must have exactly 5 slash-delimited elements, e.g. "
                        f"keyid/date/region/service/term, got '{params['Credential'][:200]}'")
    access_key, scope_date, _region, scope_service, terminator = scope_parts
    amz_date, when = _request_time(headers)
    now = now or dt.datetime.now(dt.timezone.utc)
    if when < now - MAX_SKEW:
        raise AuthError("InvalidSignatureException",
                        f"Signature expired: {amz_date} is now earlier than "
                        f"{(now - MAX_SKEW).strftime(AMZ_DATE)} ({now.strftime(AMZ_DATE)} - 5 min.)")
    if when > now + MAX_SKEW:
        raise AuthError("InvalidSignatureException",
                        f"Signature not yet current: {amz_date} is still later than "
                        f"{(now + MAX_SKEW).strftime(AMZ_DATE)} ({now.strftime(AMZ_DATE)} + 5 min.)")
    if scope_date != amz_date[:8]:
        raise AuthError("InvalidSignatureException",
                        f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version "
                        f"of date from HTTP: '{scope_date}' != '{amz_date[:8]}', from '{amz_date}'.")
    if scope_service != service:
        raise AuthError("InvalidSignatureException",
                        f"Credential should be scoped to correct service: '{service}'.")
    if terminator != "aws4_request":
        raise AuthError("InvalidSignatureException",
                        "Credential should be scoped with a valid terminator: 'aws4_request', "
                        f"not '{terminator[:40]}'.")
    signed = params["SignedHeaders"].split(";")
    if "host" not in signed:
        raise AuthError("InvalidSignatureException",
                        "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
    if access_key not in keys or headers.get("X-Amz-Security-Token"):
        # faasd issues no session tokens: a temporary credential is not one of its keys.
        raise AuthError("UnrecognizedClientException", INVALID_TOKEN)
    return params, scope_parts


def verify_sigv4(method: str, raw_path: str, raw_query: str, headers: Any, body: bytes,
                 keys: Mapping[str, str], *, service: str,
                 now: dt.datetime | None = None) -> str:
    """Check a request's SigV4 signature over its body; return its access key id or
    raise AuthError."""
    params, scope_parts = precheck_sigv4(raw_query, headers, keys, service=service, now=now)
    access_key, scope_date, region = scope_parts[0], scope_parts[1], scope_parts[2]
    amz_date, _ = _request_time(headers)
    signed = params["SignedHeaders"].split(";")
    payload_hash = hashlib.sha256(body).hexdigest()
    declared = headers.get("X-Amz-Content-SHA256")
    if declared is not None and declared != payload_hash:
        raise AuthError("InvalidSignatureException", SIGNATURE_MISMATCH)
    canonical = canonical_request(method, raw_path, raw_query, headers, signed, payload_hash)
    scope = "/".join(scope_parts[1:])
    expected = hmac.new(signing_key(keys[access_key], scope_date, region, service),
                        _bytes(_string_to_sign(amz_date, scope, canonical)),
                        hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), _bytes(params["Signature"])):
        raise AuthError("InvalidSignatureException", SIGNATURE_MISMATCH)
    return access_key


def sign_sigv4(method: str, url: str, headers: Mapping[str, str], body: bytes, *,
               access_key: str, secret: str, region: str, service: str = "lambda",
               now: dt.datetime | None = None) -> dict[str, str]:
    """Headers that sign a request (for faasd's own clients: the CLI)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    now = now or dt.datetime.now(dt.timezone.utc)
    amz_date = now.strftime(AMZ_DATE)
    signed = {k.lower(): v for k, v in headers.items()}
    signed["host"] = parts.netloc
    signed["x-amz-date"] = amz_date
    names = sorted(signed)
    canonical = canonical_request(method, parts.path or "/", parts.query, signed, names,
                                  hashlib.sha256(body).hexdigest())
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    signature = hmac.new(signing_key(secret, amz_date[:8], region, service),
                         _string_to_sign(amz_date, scope, canonical).encode(),
                         hashlib.sha256).hexdigest()
    return {**headers, "X-Amz-Date": amz_date,
            "Authorization": f"{ALGORITHM} Credential={access_key}/{scope}, "
                             f"SignedHeaders={';'.join(names)}, Signature={signature}"}
