"""The guard's settings: one dataclass, validated once, built by `atu serve` from its options."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from atu.errors import ConfigError

POLICIES = ("monitor", "block")
ON_SCORING_ERROR = ("open", "closed")
# What a client learns about the scoring (serve/disclose.py): "action" (the action and whether anything was flagged),
# "scores" (also each choice's highest score), "full" (also concept names, scores, thresholds, positions, excerpts).
DISCLOSURE = ("action", "scores", "full")
# What a flag is taken from: "completion" (a concept crossed its threshold in the generated text) or "exchange" (in
# the prompt or the completion: an answer to a question about a forgotten concept is blocked whatever it says).
FLAG_SCOPES = ("completion", "named", "exchange")
DEFAULT_REFUSAL = "I can't help with that."


@dataclass
class GuardSettings:
    """How the guard proxy behaves. Every field has a default a first user can keep."""

    upstream_url: str  # base URL of the vLLM OpenAI-compatible server, e.g. "http://127.0.0.1:8001"
    host: str = "127.0.0.1"
    port: int = 8000
    # "monitor": pass completions through and annotate them; "block": replace a flagged completion with a refusal
    # and cut a flagged stream. Block always fails closed: text that could not be scored never reaches the client.
    policy: str = "monitor"
    # "completion": the policy acts on what the model generated; the prompt's flags are annotated and counted.
    # "exchange": it acts on the prompt's flags too, the setting for a second line behind a model that may still
    # answer about a forgotten concept (the completion alone often does not say whom it is about).
    flag_scope: str = "completion"
    # Monitor only: when scoring fails, "open" passes the completion with an error annotation, "closed" answers 503.
    on_scoring_error: str = "open"
    api_key: str | None = None  # when set, every endpoint but /health needs "Authorization: Bearer <key>"
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    upstream_key: str | None = None  # sent to the upstream as "Authorization: Bearer <key>" (atu serve's own vLLM)
    upstream_timeout: float = 60.0  # seconds for a whole non-streamed upstream answer (or between stream chunks)
    connect_timeout: float = 5.0  # seconds to reach the upstream server; past it the guard answers 503
    # Streams under "block": text is held back until scored, first in groups of stream_score_every chunks (1 = every
    # chunk), each group twice the last up to stream_score_max_every. A scoring's fixed cost (one predictor call per
    # batch) then comes a logarithmic number of times for short streams, while the first bytes wait only for the
    # first group; set both equal for groups of one size.
    stream_score_every: int = 8
    stream_score_max_every: int = 64
    max_batch: int = 32  # scoring requests batched together in one model forward
    refusal: str = DEFAULT_REFUSAL  # what a blocked completion is replaced with
    audit_path: str | None = None  # SQLite audit log; None: no audit log
    audit_store_text: bool = False  # store raw prompt and completion text (else hashes and flagged spans only)
    # What responses reveal of the scoring. The default tells a client only what happened to its request: the set
    # of forgotten concepts and their thresholds are the operator's to know (see serve/disclose.py).
    disclose: str = "action"
    # Key of the operator-only views (/v1/leakage, /metrics); must differ from api_key. None: those views answer 403.
    operator_key: str | None = None
    metric_concept_names: bool = False  # /metrics labels: concept names instead of stable ids ("c0", "c1", ...)
    # Bounds under load: past max_concurrency generation requests in flight the guard answers 429 (Retry-After).
    max_concurrency: int = 256
    max_n: int = 8  # choices per prompt ("n")
    max_tokens: int = 4096  # "max_tokens" / "max_completion_tokens" a client may ask for
    max_prompts: int = 32  # prompts in one /v1/completions request
    max_scoring_queue: int = 1024  # exchanges waiting to be scored; past it a request is answered 429
    scoring_timeout: float = 30.0  # seconds one scoring may take; past it the exchange fails as scoring failures do
    # A concept whose name is written out in a part is flagged there whatever the predictor scores (serve/names.py).
    match_names: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.upstream_url, str) or not self.upstream_url.startswith(("http://", "https://")):
            raise ConfigError(f"upstream_url must be an http(s) URL, got {self.upstream_url!r}.")
        self.upstream_url = self.upstream_url.rstrip("/")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {self.policy!r}.")
        if self.flag_scope not in FLAG_SCOPES:
            raise ConfigError(f"flag_scope must be one of {FLAG_SCOPES}, got {self.flag_scope!r}.")
        if self.on_scoring_error not in ON_SCORING_ERROR:
            raise ConfigError(f"on_scoring_error must be one of {ON_SCORING_ERROR}, got {self.on_scoring_error!r}.")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError(f"port must be an int in 0..65535, got {self.port!r}.")
        if self.disclose not in DISCLOSURE:
            raise ConfigError(f"disclose must be one of {DISCLOSURE}, got {self.disclose!r}.")
        ints = ("max_body_bytes", "stream_score_every", "stream_score_max_every", "max_batch", "max_concurrency")
        for name in (*ints, "max_n", "max_tokens", "max_prompts", "max_scoring_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}.")
        for name in ("upstream_timeout", "connect_timeout", "scoring_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}.")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ConfigError("api_key must be a non-empty string or None.")
        if self.operator_key is not None and (not isinstance(self.operator_key, str) or not self.operator_key.strip()):
            raise ConfigError("operator_key must be a non-empty string or None.")
        if self.operator_key is not None and self.operator_key == self.api_key:
            raise ConfigError("operator_key must differ from api_key: a client must not read the operator's view.")

    @property
    def fail_open(self) -> bool:
        """Whether a completion that could not be scored still reaches the client (never under "block")."""
        return self.policy == "monitor" and self.on_scoring_error == "open"

    def public_dict(self) -> dict[str, Any]:
        """The settings without the API key, for logs and /health."""
        out = asdict(self)
        out["api_key"] = "set" if self.api_key else None
        out["operator_key"] = "set" if self.operator_key else None
        out["upstream_key"] = "set" if self.upstream_key else None
        return out
