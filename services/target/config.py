"""The target-model service's configuration."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.config import ConfigError, field
from services.common.errors import InvalidArgument
from services.common.validation import check_address, check_gamma_range
from services.serving.model_service import ModelServiceConfig
from services.common.paths import default_model_path
from services.speculative.gamma import SpeculationSettings


class SpeculativeMethod(str, enum.Enum):
    """How the draft service proposes for requests that do not say."""

    DRAFT_MODEL = "draft_model"
    NGRAM = "ngram"


@dataclass
class TargetConfig(ModelServiceConfig):
    """llmesh target-model service: serves a causal LM with continuous batching."""

    SERVICE = "target"

    port: int = field(50061, "port to listen on (0: any free port)")
    draft_address: str = field("", "default draft instance (host:port) for speculative decoding")
    speculation_default: bool = field(False, "speculate for requests that do not say")
    gamma: int = field(4, "draft tokens proposed per round (starting value)")
    gamma_min: int = field(1, "lowest adaptive gamma")
    gamma_max: int = field(8, "highest adaptive gamma")
    draft_timeout_ms: float = field(500.0, "longest wait for a draft round before decoding without it")
    draft_hold_ms: float = field(50.0, "longest the whole batch waits for outstanding draft proposals (0: never)")
    speculative_disable_by_batch_size: int = field(
        0, "0: gamma (0 = off) chosen each step by the measured cost model; N > 0: a static override, no "
           "speculation while more than N sequences run or wait (vLLM's name)",
        deprecated=("speculation_max_batch",))
    speculative_method: SpeculativeMethod = field(
        SpeculativeMethod.DRAFT_MODEL, "how the draft proposes for requests that do not say: draft_model (its "
                                       "model) or ngram (n-gram lookup in the sequence, no model; vLLM's name)")
    speculation_min_acceptance: float = field(0.25, "a sequence below this acceptance stops speculating")

    def speculation_settings(self) -> SpeculationSettings:
        return SpeculationSettings(draft_timeout_ms=self.draft_timeout_ms, draft_hold_ms=self.draft_hold_ms,
                                   disable_by_batch_size=self.speculative_disable_by_batch_size,
                                   min_acceptance=self.speculation_min_acceptance)

    def __post_init__(self) -> None:
        if not self.model:
            self.model = str(default_model_path("target"))

    def validate(self) -> None:
        super().validate()
        try:
            check_gamma_range(self.gamma_min, self.gamma, self.gamma_max)
            if self.draft_address:
                check_address("draft_address", self.draft_address)
        except InvalidArgument as exc:
            raise ConfigError(str(exc)) from None
        self.require(self.draft_timeout_ms > 0, "draft_timeout_ms", "must be > 0")
        self.require(self.draft_hold_ms >= 0, "draft_hold_ms", "must be >= 0 (0: never hold)")
        self.require(self.speculative_disable_by_batch_size >= 0, "speculative_disable_by_batch_size",
                     "must be >= 0 (0: the cost model decides)")
        self.require(0 <= self.speculation_min_acceptance <= 1, "speculation_min_acceptance", "must be in [0, 1]")
