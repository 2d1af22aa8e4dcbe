"""The draft-model service's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import field
from services.serving.model_service import ModelServiceConfig
from services.common.paths import default_model_path


@dataclass
class DraftConfig(ModelServiceConfig):
    """llmesh draft-model service: proposes tokens for targets to verify."""

    SERVICE = "draft"

    port: int = field(50071, "port to listen on (0: any free port)")
    max_batch_size: int = field(64, "most draft streams computed in one batch")
    num_slots: int = field(128, "KV-cache slots: draft streams open at once")
    max_queue: int = field(512, "streams waiting for a slot beyond which new ones get RESOURCE_EXHAUSTED")

    def __post_init__(self) -> None:
        if not self.model:
            self.model = str(default_model_path("draft"))
