"""Which model serves a request: the one it names, or the first installed model of the
task's preference list that can honour the language hint."""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import BadRequest, CapabilityMissing, ModelNotFound, ModelNotInstalled
from core.types import Capability
from models.adapter import ModelAdapter, adapter_class
from models.registry import ModelRegistry, RegistryEntry, not_installed_message


STRUCTURED_FORMATS = ("markdown", "json")


@dataclass(frozen=True)
class Selection:
    """The model that serves, and when it is not the one the client named, which one and why."""

    model_id: str
    requested_model: str | None = None  # set only when the request was served by another model
    fallback_reason: str | None = None

    @property
    def fell_back(self) -> bool:
        return self.requested_model is not None


class ModelSelector:
    def __init__(self, registry: ModelRegistry, *, ocr_fallback: bool = False) -> None:
        self.registry = registry
        self.ocr_fallback = ocr_fallback
        self._probes: dict[str, ModelAdapter] = {}

    def entry(self, model_id: str) -> RegistryEntry:
        entry = self.registry.get(model_id)
        if entry is None:
            raise ModelNotFound(f"Model '{model_id}' not found", param="model")
        return entry

    def supports_language(self, entry: RegistryEntry, language: str | None) -> bool:
        return self._supports_language(entry, language)

    def _supports_language(self, entry: RegistryEntry, language: str | None) -> bool:
        if language is None:
            return True
        if Capability.LAYOUT in entry.capabilities:  # a document pipeline reads through its OCR engines
            engines = [self.registry.get(e) for e in (entry.spec.options or {}).get("engines", ["rapidocr", "tesseract"])]
            return any(e is not None and e.install_state().installed and self._supports_language(e, language)
                       for e in engines)
        probe = self._probes.get(entry.id)
        if probe is None or getattr(probe, "spec", entry.spec) is not entry.spec:  # cheap: nothing is loaded; new settings, new probe
            probe = self._probes[entry.id] = adapter_class(entry.spec.kind)(entry.spec)
        return probe.supports_language(language)

    def select(self, capability: Capability, requested: str | None, language: str | None = None) -> str:
        """Return the id of the model that will serve, or raise the error the client should see."""
        return self.resolve(capability, requested, language).model_id

    def resolve(self, capability: Capability, requested: str | None, language: str | None = None,
                format: str = "text") -> Selection:
        """The model that will serve, with the reason when it is not the one named.

        A named OCR model that is not installed (weights missing, not one that failed to load) is
        replaced by the default route when ``routing.ocr_fallback`` is on: seed 003's own client
        always names ``qwen3_vl_2b``, and a CPU machine should still read its pages."""
        if requested:
            entry = self.entry(requested)
            if capability not in entry.capabilities:
                raise CapabilityMissing(f"Model '{requested}' cannot do {capability.value}", param="model")
            state = entry.install_state()
            if state.installed:
                if not self._supports_language(entry, language):
                    raise BadRequest(f"Model '{requested}' cannot read language '{language}'",
                                     param="language", code="LANGUAGE_NOT_SUPPORTED")
                return Selection(entry.id)
            if not (capability is Capability.OCR and self.ocr_fallback):
                raise ModelNotInstalled(not_installed_message(entry, state.reason), param="model")
            served = self._first_installed(capability, language, format)
            return Selection(served, requested_model=entry.id,
                             fallback_reason=f"model '{entry.id}' is not installed ({state.reason}); "
                                             f"served by '{served}' (routing.ocr_fallback)")
        return Selection(self._first_installed(capability, language, format))

    def _first_installed(self, capability: Capability, language: str | None, format: str = "text") -> str:
        candidates = [self.registry.get(m) for m in self.registry.defaults.get(capability, [])]
        if format not in STRUCTURED_FORMATS:  # plain text stays on the plain engines: layout costs time
            candidates = [e for e in candidates if e is None or Capability.LAYOUT not in e.capabilities]
        installed = [e for e in candidates if e is not None and e.install_state().installed]
        for entry in installed:
            if self._supports_language(entry, language):
                return entry.id
        if installed:
            raise BadRequest(f"No installed model can read language '{language}'",
                             param="language", code="LANGUAGE_NOT_SUPPORTED")
        first = next((e for e in candidates if e is not None), None)
        if first is None:
            raise ModelNotInstalled(f"No model is configured for {capability.value}", param="model")
        raise ModelNotInstalled(f"No {capability.value} model is installed. "
                                + not_installed_message(first, first.install_state().reason), param="model")
