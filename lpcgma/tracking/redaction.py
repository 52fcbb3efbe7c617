"""Keep secrets out of MLflow: no param, tag or artifact whose name looks like a key, token or password.

Three rules, applied to everything the tracking code logs:

- a key (param or tag name, a config key, a YAML key) whose words include ``key``, ``token``,
  ``secret``, ``password``/``passwd``/``pwd``, ``credential(s)``, ``auth`` or ``cookie`` — or that
  contains ``secret``, ``token``, ``passw``, ``apikey``, ``accesskey`` or ``privatekey`` anywhere —
  is dropped (params, tags) or its value replaced by ``<redacted>`` (config files);
- a value holding a URL with a password (``https://user:pw@host``) has the password masked;
- a value that contains the value of a secret-looking environment variable (e.g.
  ``AWS_SECRET_ACCESS_KEY``) is masked.

Environment variables themselves are never logged by this project.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

REDACTED = "<redacted>"

_SECRET_WORDS = frozenset(
    {
        "key",
        "keys",
        "token",
        "tokens",
        "secret",
        "secrets",
        "password",
        "passwords",
        "passwd",
        "pwd",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "cookie",
        "cookies",
        "passphrase",
    }
)
_SECRET_SUBSTRINGS = ("secret", "token", "passw", "apikey", "accesskey", "privatekey", "credential")
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
# keys that merely mention one of the words but hold no secret
_ALLOWED_KEYS = frozenset({"mlflow.user", "mlflow.source.git.commit"})
# environment variables that only look secret: the shell's working directories (PWD = "print working
# directory", not "password")
_NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})


def is_secret_key(key: str) -> bool:
    """True when the name `key` (dotted, snake, kebab or camel case) looks like it holds a secret."""
    if key in _ALLOWED_KEYS:
        return False
    spaced = _CAMEL.sub("_", key).lower()
    words = set(_WORD_SPLIT.split(spaced))
    if words & _SECRET_WORDS:
        return True
    flat = _WORD_SPLIT.sub("", spaced)
    return any(s in flat for s in _SECRET_SUBSTRINGS)


def secret_env_values(min_length: int = 6) -> list[str]:
    """Values of environment variables whose names look secret (longest first)."""
    values = {
        v for k, v in os.environ.items() if k not in _NOT_SECRET_ENV and is_secret_key(k) and len(v) >= min_length
    }
    return sorted(values, key=len, reverse=True)


def redact_value(value: Any, env_secrets: list[str] | None = None) -> Any:
    """`value` with URL passwords and known secret environment values masked (strings only)."""
    if not isinstance(value, str):
        return value
    out = _URL_PASSWORD.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{REDACTED}@", value)
    for secret in secret_env_values() if env_secrets is None else env_secrets:
        if secret in out:
            out = out.replace(secret, REDACTED)
    return out


def redact_mapping(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Drop secret-looking keys and mask secret-looking values; return (kept, dropped key names)."""
    env_secrets = secret_env_values()
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in values.items():
        if is_secret_key(key):
            dropped.append(key)
        else:
            kept[key] = redact_value(value, env_secrets)
    return kept, sorted(dropped)


def redact_tree(tree: Any, env_secrets: list[str] | None = None) -> Any:
    """A nested dict/list with the values of secret-looking keys replaced by ``<redacted>``."""
    env_secrets = secret_env_values() if env_secrets is None else env_secrets
    if isinstance(tree, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_key(k) else redact_tree(v, env_secrets))
            for k, v in tree.items()
        }
    if isinstance(tree, (list, tuple)):
        return [redact_tree(v, env_secrets) for v in tree]
    return redact_value(tree, env_secrets)


def redact_yaml_text(text: str) -> str:
    """A YAML document (e.g. a resolved config) with secret-looking keys' values redacted."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return str(redact_value(text))
    return yaml.safe_dump(redact_tree(tree), sort_keys=False)


__all__ = [
    "REDACTED",
    "is_secret_key",
    "redact_mapping",
    "redact_tree",
    "redact_value",
    "redact_yaml_text",
    "secret_env_values",
]
