"""Redaction of third-party TTS credentials before anything is written.

Where secrets live in a stage: ``externalVoice`` and ``voiceOverrides`` are an
``ExternalVoice`` one-of, ``{<provider>: {<provider settings>}}``. A ``generic`` voice
carries the HTTP ``headers`` of the user's TTS service, usually ``Authorization:
Bearer …`` or an API key. So, inside every provider object (known or unknown):

* every value of ``headers`` becomes ``"<redacted>"``; header names are kept. This is
  done for any provider, not only ``generic``: a future HTTP-based provider's headers
  are just as secret. A ``headers`` value that is not an object is redacted whole;
* any key, at any depth (e.g. inside a generic voice's ``body``), whose name looks like
  a credential (``Authorization``, ``api_key``, ``X-API-Key``, ``clientSecret``,
  ``access-token``, …) has its value replaced by ``"<redacted>"``.

Nothing else of the stage is touched. Objects are copied only along the path to a
redacted value, so a stage with nothing to redact comes back as the very same object
(cheap, and a caller can test ``result is stage``). Inputs are never mutated; values
of unexpected types are returned unchanged.
"""

from __future__ import annotations

from typing import Any

REDACTED = "<redacted>"
VOICE_FIELDS = ("externalVoice", "voiceOverrides")

# Names compared after lower-casing and dropping "-" and "_": "X-API-Key" → "xapikey".
_CREDENTIAL_NAMES = frozenset(
    {
        "authorization", "proxyauthorization", "auth", "bearer", "token", "secret", "password",
        "passwd", "passphrase", "credential", "credentials", "cookie", "setcookie", "signature",
        "sessionid", "privatekey", "clientsecret", "apikey", "xapikey", "accesskey", "secretkey",
        "subscriptionkey", "ocpapimsubscriptionkey",
    }
)
# ...or ending like a credential: "xiApiKey", "accessToken", "refresh_token",
# "awsSecretAccessKey", "authToken", "dbPassword". Not "maxTokens" ("tokens").
_CREDENTIAL_SUFFIXES = (
    "token", "secret", "password", "passwd", "apikey", "accesskey", "secretkey", "privatekey",
    "credential", "credentials", "authorization", "subscriptionkey",
)
_name_cache: dict[str, bool] = {}
#: Every credential name above contains one of these (tests keep them in sync).
_TRIGGERS = ("key", "token", "secret", "pass", "auth", "bearer", "credential", "cookie", "signature", "session")


def is_credential_name(name: str) -> bool:
    """True when a JSON key looks like it holds a credential (case/``-``/``_`` blind)."""
    known = _name_cache.get(name)
    if known is None:
        folded = name.lower().replace("-", "").replace("_", "")
        known = folded in _CREDENTIAL_NAMES or folded.endswith(_CREDENTIAL_SUFFIXES)
        if len(_name_cache) < 10_000:  # keys are few and repetitive; bound it anyway
            _name_cache[name] = known
    return known


def may_hold_secret(json_text: str) -> bool:
    """Cheap pre-check on the JSON text of a provider object: False guarantees that
    :func:`redact_provider` would not change it (no ``headers``, no credential-like
    key at any depth), so the object can be used as it is.

    Folding the whole text like the key names are folded keeps every credential key
    a substring of it, so looking for a few fragments is enough; values that happen to
    contain one ("keyboard") only cost the full check.
    """
    folded = json_text.lower().replace("-", "").replace("_", "")
    return (
        '"headers"' in folded or "key" in folded or "token" in folded or "secret" in folded
        or "pass" in folded or "auth" in folded or "bearer" in folded or "credential" in folded
        or "cookie" in folded or "signature" in folded or "session" in folded
    )


def _scrub(value: Any) -> Any:
    """``value`` with credential-named keys redacted at any depth (same object if none)."""
    if isinstance(value, dict):
        out: dict[Any, Any] | None = None
        for key, item in value.items():
            if isinstance(key, str) and is_credential_name(key):
                new: Any = REDACTED
            elif isinstance(item, (dict, list)):
                new = _scrub(item)
            else:
                continue
            if new is not item:
                if out is None:
                    out = dict(value)
                out[key] = new
        return value if out is None else out
    if isinstance(value, list):
        items = [_scrub(item) for item in value]
        return value if all(a is b for a, b in zip(items, value)) else items
    return value


def redact_provider(settings: Any) -> Any:
    """One provider object (``{"url": ..., "headers": {...}, ...}``), redacted."""
    if not isinstance(settings, dict):
        return settings
    out = _scrub(settings)
    headers = out.get("headers")
    if headers is not None and headers != {}:
        if out is settings:
            out = dict(settings)
        # Header values are credentials for the third-party TTS; names are useful.
        out["headers"] = {name: REDACTED for name in headers} if isinstance(headers, dict) else REDACTED
    return out


def redact_voice(voice: Any) -> Any:
    """An ExternalVoice object (``{provider: settings}``) with secrets redacted."""
    if not isinstance(voice, dict):
        return voice
    out: dict[str, Any] | None = None
    for provider, settings in voice.items():
        clean = redact_provider(settings)
        if clean is not settings:
            if out is None:
                out = dict(voice)
            out[provider] = clean
    return voice if out is None else out


def redact_stage(stage: Any) -> Any:
    """The stage with voice secrets redacted; the same object when there are none."""
    if not isinstance(stage, dict):
        return stage
    out = stage
    for name in VOICE_FIELDS:
        voice = stage.get(name)
        if voice:
            clean = redact_voice(voice)
            if clean is not voice:
                if out is stage:
                    out = dict(stage)
                out[name] = clean
    return out


def redact_page(page: Any) -> Any:
    """A stages page (``{"results": [...], ...}``) with every stage redacted."""
    if not isinstance(page, dict) or not isinstance(page.get("results"), list):
        return page
    results = page["results"]
    clean = [redact_stage(stage) for stage in results]
    if all(a is b for a, b in zip(clean, results)):
        return page
    return {**page, "results": clean}


def redact_call(call: Any) -> Any:
    """A call listed by ``GET /api/calls`` with voice secrets redacted."""
    return redact_stage(call)
