"""The simulated API's fault and hostile-mode names, apart from the app so the CLI can
list them without loading the HTTP stack."""

from __future__ import annotations

FAULT_KINDS = frozenset({"429", "500", "502", "503", "504", "reset", "truncated", "invalid_json"})
# What a call picked for each hostile kind gets on its stages endpoint.
HOSTILE_KIND_DOCS: dict[str, str] = {
    "invalid_next": "the first page's `next` is a URL no parser accepts (open IPv6 bracket, bad IDNA, NUL, tab)",
    "corrupt_gzip": "200 with Content-Encoding: gzip and a body that is not gzip",
    "deep_nesting": "200 with a page whose results hold JSON nested 100,000 levels deep",
    "deep_voice": "the first stage's externalVoice.generic.body is 600 nested lists",
    "lone_surrogate": "the first stage's systemPrompt, voice and an initialState key carry the escape \\ud800",
    "slow_body": "headers at once, then the body one byte per slow_body_interval seconds",
    "reused_stage_id": "the first stage reuses the callStageId of a stage of another served call",
    "echo_key": "500 whose detail echoes the X-API-Key received; 401/403 bodies echo credentials too",
    "secret_shapes": "voices hide uvx-planted-secret-* credentials in every shape; the listed call carries one",
    "huge_pages": "400 pages of one stage with a ~2 MB prompt each, built on request",
}
HOSTILE_KINDS = frozenset(HOSTILE_KIND_DOCS)
