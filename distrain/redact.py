"""Secrets never written: one redaction for every file distrain writes and every line it prints.

Usage:
    from distrain.redact import redact, has_credentials, SECRET_NAME
    redact("s3://AKIA:abc@bucket/x?X-Amz-Signature=f00")   # 's3://<redacted>@bucket/x?X-Amz-Signature=<redacted>'
    redact({"data": {"shards": "https://u:p@host/s"}})      # nested dicts and lists too
    has_credentials("https://u:p@host/s")                   # True
    SECRET_NAME.search("WANDB_API_KEY")                     # a variable name that holds a secret

What counts as a secret: the user-info part of a URL (`scheme://user:pass@host`), query parameters whose name looks
like a credential (`X-Amz-Signature`, `X-Amz-Credential`, `sig`, `token`, `key`, `password`, ...; presigned S3,
GCS and Azure SAS URLs), and the values of environment variables whose names look like secrets (`WANDB_API_KEY`,
`AWS_SECRET_ACCESS_KEY`, `RAY_AUTH_TOKEN`, ...) wherever they appear. Credentials belong in the environment (AWS_*,
~/.aws, WANDB_API_KEY), which every part of distrain reads them from; a file or a log line only ever shows
`<redacted>`.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"
# Environment variable names that hold secrets (the one list: submit's checks and redaction use it).
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|SIGNATURE", re.IGNORECASE)
# Names that look like a secret but are not one.
_NOT_SECRET = re.compile(r"^(RAY_AUTH_TOKEN_PATH|.*_KEY_ID|.*KEYRING.*|.*_KEYS?_FILE|.*SIGNATURE_VERSION)$",
                         re.IGNORECASE)
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s?#]+@")
_PARAM = re.compile(r"([?&;])([^=&;#\s]*(?:key|secret|token|password|passwd|signature|sig|credential|auth)"
                    r"[^=&;#\s]*)=[^&;#\s]*", re.IGNORECASE)


def secret_values(environ: dict | None = None) -> list[str]:
    """Values of secret-named environment variables (8 characters or more), longest first."""
    env = os.environ if environ is None else environ
    values = [v for k, v in env.items() if SECRET_NAME.search(k) and not _NOT_SECRET.match(k) and len(v) >= 8]
    return sorted(set(values), key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    secrets = secret_values() if secrets is None else secrets
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    if "://" in text:
        text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    if "=" in text:
        text = _PARAM.sub(rf"\1\2={REDACTED}", text)
    return text


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """`value` with credentials replaced by `<redacted>`: strings, and dicts/lists/tuples of them, recursively."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value) if isinstance(value, tuple) else \
            [redact(v, secrets) for v in value]
    return value


def has_credentials(text: str) -> bool:
    """Whether a string carries a credential of its own (URL user-info or a credential query parameter)."""
    return redact_text(text, []) != text
