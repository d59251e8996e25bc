"""Schemas of GET/PUT /api/config (seed 004): the live keys, each optional in a PUT (partial update;
``null`` drops a stored change), unknown keys refused."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from core.config import AlertThresholds
from management.monitor.live_config import LiveValues


def _partial(model: type[BaseModel], name: str, replace: dict[str, Any] | None = None) -> type[BaseModel]:
    """``model`` with every field optional (same ranges), for a partial update."""
    fields: dict[str, Any] = {}
    for key, info in model.model_fields.items():
        annotation = (replace or {}).get(key, info.annotation)
        fields[key] = (Optional[annotation], FieldInfo.merge_field_infos(info, default=None))
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


ThresholdsPatch = _partial(AlertThresholds, "ThresholdsPatch")
ConfigUpdate = _partial(LiveValues, "ConfigUpdate", {"alert_thresholds": ThresholdsPatch,
                                                     "log_level": Literal["DEBUG", "INFO", "WARNING", "ERROR",
                                                                          "debug", "info", "warning", "error"]})


class ConfigResponse(LiveValues):
    sources: dict[str, Any] = Field(description='Where each value comes from: "database" (PUT /api/config), '
                                                '"config" (config.yaml, environment or flag) or "default"; '
                                                "per threshold for alert_thresholds")
    changed: dict[str, Any] | None = Field(None, description="PUT only: the keys this change altered, new values")
