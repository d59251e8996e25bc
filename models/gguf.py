"""GGUF files (llama.cpp, Ollama, LM Studio) as a weights format.

transformers reads a GGUF file through the ``gguf`` package and dequantizes it into a normal
model; that takes seconds to minutes, so it is done once per file content and cached as a
safetensors folder under ``<cache_dir>/gguf/<sha256>/``. The tokenizer and its chat template
come from the file. Every later load reads the cached folder like any Hugging Face snapshot.

Nothing here imports torch or transformers at module level: the registry calls the cheap
checks to list models.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from core.errors import ModelLoadFailed
from models.adapter import InstallState

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
DONE_MARKER = "chatvlm-converted.json"  # written last: a folder without it is incomplete


def gguf_file(path: Path | None) -> Path | None:
    """The GGUF file a weights path means: the path itself, or the one ``*.gguf`` in a folder
    that holds no ``config.json`` (a Hugging Face folder wins over a stray GGUF beside it)."""
    if path is None:
        return None
    if path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if found:
            return found[0] if len(found) == 1 else _pick_several(found)
    return None


def _pick_several(files: list[Path]) -> Path:
    """Several GGUF files in one folder (quantization variants): the largest, most precise one."""
    return max(files, key=lambda f: f.stat().st_size)


def install_state(file: Path) -> InstallState:
    """Cheap: the file exists and starts with the GGUF magic. A truncated or unmappable file is
    found at load time and reported as a load failure with its reason."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(4)
    except FileNotFoundError:
        return InstallState(False, f"no GGUF file at {file.as_posix()}")
    except OSError:
        return InstallState(False, f"the GGUF file {file.as_posix()} cannot be read")
    if head != MAGIC:
        return InstallState(False, f"{file.name} is not a GGUF file (bad magic)")
    return InstallState(True)


def content_hash(file: Path, cache_root: Path) -> str:
    """SHA-256 of the file's bytes, remembered per (path, size, mtime) so a start does not rehash."""
    stat = file.stat()
    key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_root / "hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    index[key] = digest.hexdigest()
    cache_root.mkdir(parents=True, exist_ok=True)
    _atomic_write(index_path, json.dumps(index))
    return index[key]


def converted_folder(file: Path, cache_dir: Path, model_id: str) -> Path:
    """The cached safetensors folder for this GGUF file, converting it first when needed.

    Safe across processes: one converts under a file lock while the others wait, and the
    folder appears by an atomic rename only once complete."""
    root = cache_dir / "gguf"
    digest = content_hash(file, root)
    target = root / digest
    if (target / DONE_MARKER).is_file():
        return target
    with _file_lock(root / f"{digest}.lock"):
        if (target / DONE_MARKER).is_file():
            return target
        architecture = read_architecture(file, model_id)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f"{digest[:12]}-", dir=root))
        try:
            _convert(file, work, model_id, architecture)
            _atomic_write(work / DONE_MARKER, json.dumps({
                "source": str(file), "sha256": digest, "architecture": architecture,
                "seconds": round(time.monotonic() - started, 2)}))
            if target.exists():  # an incomplete folder left by a crash
                shutil.rmtree(target)
            os.replace(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log.info("converted %s (%s) to %s in %.1fs", file.name, architecture, target, time.monotonic() - started)
    return target


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))


def read_architecture(file: Path, model_id: str) -> str:
    """``general.architecture`` from the file's header; a corrupt or truncated file, or an
    architecture transformers cannot map, is a load failure that says so."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(file))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
        tensors = len(reader.tensors)
    except Exception:  # noqa: BLE001 - gguf raises many kinds of errors on a damaged file
        raise ModelLoadFailed(f"model '{model_id}': {file.name} is truncated or corrupt "
                              "(its GGUF header or tensor table cannot be read)") from None
    if not tensors:
        raise ModelLoadFailed(f"model '{model_id}': {file.name} holds no tensors")
    supported = supported_architectures()
    if architecture not in supported:
        raise ModelLoadFailed(f"model '{model_id}': GGUF architecture '{architecture}' cannot be loaded by "
                              f"transformers (it maps: {', '.join(supported)})")
    return architecture


def _convert(file: Path, out: Path, model_id: str, architecture: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a progress bar per tensor is noise in a server's log
    folder, name = str(file.parent), file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        # fp32 holds every dequantized value exactly; the precision to run at is chosen at load.
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                     dtype=torch.float32)
    except Exception:
        log.exception("converting %s failed", file)
        raise ModelLoadFailed(f"model '{model_id}': {file.name} ({architecture}) could not be converted: "
                              "the file may be truncated or use a quantization transformers cannot read") from None
    # The GGUF quantizer only describes how the file was read; the saved folder is plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
