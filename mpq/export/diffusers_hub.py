"""``from_pretrained`` for ``mpq export`` folders: a diffusers quantizer for ``quant_method: mpq``.

After ``import mpq``, ``DiffusionPipeline.from_pretrained(OUT)`` and the denoiser class's own
``from_pretrained(OUT/<unet|transformer>)`` load an ``mpq export --format mpq`` folder as
:func:`mpq.load_quantized` does: the quantized layers become :class:`~mpq.export.packed.PackedLayer` modules that
keep their packed weights in memory.

Registration: diffusers finds a model's quantizer by the ``quant_method`` of the ``quantization_config`` in its
config.json, in two dicts of ``diffusers.quantizers.auto`` (``AUTO_QUANTIZATION_CONFIG_MAPPING``,
``AUTO_QUANTIZER_MAPPING``); :func:`register` adds ``"mpq"`` to both (idempotent). Importing diffusers takes
seconds and ``import mpq`` does not: :func:`register_on_import` registers at once if that module is loaded, else
as soon as it is (an import hook that runs after it, then removes itself).

``quant_method``: diffusers reads ``quantization_config.quant_method`` as its ``QuantizationMethod``, a ``str``
Enum (``.value`` for its user agent, ``==`` and dict lookups by the string). :class:`MpqMethod` is mpq's own
one-member ``str`` Enum (as SD.Next's sdnq does): ``MpqMethod.MPQ == "mpq"``, it hashes as ``"mpq"``, has
``.value`` and writes ``"mpq"`` to JSON; diffusers' Enum is left as it is.

Loading: the quantizer takes over. diffusers builds the model with empty weights and passes the checkpoint's path
(``maybe_update_loaded_keys``); before its weight loading the quantizer runs what :func:`load_denoiser` runs
(:func:`~mpq.export.mpq_format.check_qconfig`, :func:`~mpq.export.mpq_format.install_packed_layers`: checksums,
``PackedLayer`` swaps, strict assignment; ``_cast``: quant params stay fp32) and leaves diffusers nothing to assign.
``torch_dtype`` is the compute dtype (``None``: fp32, as ``load_quantized``). Those hooks exist from diffusers 0.39
(:data:`SUPPORTED`); an older diffusers gets a one-line :class:`~mpq.errors.MpqError`.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Any

from mpq.errors import MpqError

SUPPORTED = "diffusers>=0.39,<0.43"  # the quantizer hooks used here: maybe_update_loaded_keys/_state_dict (0.39)
_AUTO = "diffusers.quantizers.auto"
_FALLBACK = "load it with mpq.load_quantized(folder)"


class MpqMethod(StrEnum):
    """``quant_method`` of an mpq export, as diffusers compares and serializes it."""

    MPQ = "mpq"


def _diffusers_version() -> str:
    try:
        import diffusers

        return str(diffusers.__version__)
    except ImportError:
        return "(not installed)"


def _unsupported(why: str) -> MpqError:
    return MpqError(
        f"diffusers {_diffusers_version()} {why}; mpq exports load with from_pretrained on {SUPPORTED}, or {_FALLBACK}"
    )


@functools.cache
def _classes() -> tuple[type, type]:
    """(MpqConfig, MpqQuantizer), made once (they subclass diffusers' classes: importing diffusers)."""
    import torch
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

    from mpq.export.mpq_format import _cast, check_qconfig, install_packed_layers

    class MpqConfig(QuantizationConfigMixin):
        """An mpq export's ``quantization_config``: every key as written (``format``, ``layers``, ...), kept as
        attributes and returned by :meth:`to_dict`."""

        def __init__(self, **fields: Any) -> None:
            fields.pop("quant_method", None)
            self.quant_method = MpqMethod.MPQ
            for key, value in fields.items():
                setattr(self, key, value)

        def to_diff_dict(self) -> dict[str, Any]:
            return self.to_dict()

        def qconfig(self) -> dict[str, Any]:
            """The dict as in config.json (``quant_method`` the plain string)."""
            return {**self.to_dict(), "quant_method": self.quant_method.value}

    class MpqQuantizer(DiffusersQuantizer):
        """Loads an mpq export's denoiser (it cannot quantize an FP model: that is ``mpq run`` + ``mpq export``)."""

        requires_calibration = False
        required_packages = None

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            if not self.pre_quantized:
                raise MpqError(
                    "quant_method 'mpq' only loads `mpq export` folders (their denoiser's config.json names it); to "
                    "quantize a pipeline run `mpq run` and `mpq export`, or use mpq.quantize_"
                )
            if not hasattr(DiffusersQuantizer, "maybe_update_loaded_keys"):
                raise _unsupported("does not pass the checkpoint to its quantizers")
            self.dtype: torch.dtype | None = None
            self.weights: Path | None = None
            self.loaded_keys: list[str] | None = None

        def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
            self.dtype = torch_dtype
            return torch_dtype

        def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[Any]) -> list[str]:
            if len(checkpoint_files) != 1 or not isinstance(checkpoint_files[0], (str, Path)):
                raise MpqError(
                    f"{checkpoint_files[0]}: an mpq export's denoiser is one safetensors file, not "
                    f"{len(checkpoint_files)} shards; re-export with `mpq export`"
                )
            self.weights = Path(checkpoint_files[0])
            self.loaded_keys = list(loaded_keys)
            return self.loaded_keys

        def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
            if self.weights is None or self.loaded_keys is None:
                raise _unsupported("did not pass the checkpoint to the quantizer")
            cfg_path = self.weights.parent / "config.json"
            qconfig = self.quantization_config.qconfig()
            check_qconfig(qconfig, cfg_path)
            install_packed_layers(model, qconfig, cfg_path, self.weights)
            _cast(model, self.dtype or torch.float32)
            self.loaded_keys[:] = list(model.state_dict())  # every tensor assigned: none missing, none unexpected
            return model

        def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
            return {}  # assigned above: diffusers has nothing left to load (nor to cast)

        def check_if_quantized_param(self, *args: Any, **kwargs: Any) -> bool:
            return True  # should a diffusers path still pass tensors: they are in place already

        def create_quantized_param(self, *args: Any, **kwargs: Any) -> None:
            return None

        @property
        def supports_parallel_loading(self) -> bool:
            return False

        def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
            model.eval().requires_grad_(False)
            model.mpq_quantization_config = self.quantization_config.qconfig()
            return model

        @property
        def is_serializable(self) -> bool:
            warnings.warn(
                "a model loaded from an mpq export is not saved again with save_pretrained: the export folder is its "
                "serialized form (copy it, or write another with `mpq export`)",
                stacklevel=2,
            )
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    for cls in (MpqConfig, MpqQuantizer):  # found by name on this module (pickle, reprs)
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return MpqConfig, MpqQuantizer


def __getattr__(name: str) -> Any:
    if name in ("MpqConfig", "MpqQuantizer"):
        return _classes()[name == "MpqQuantizer"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Add ``quant_method: mpq`` to diffusers' quantizer registry (imports diffusers; idempotent). One-line
    :class:`~mpq.errors.MpqError` where diffusers has no registry, or another package took ``"mpq"``."""
    auto = sys.modules.get(_AUTO)
    if auto is None:
        try:
            import diffusers.quantizers.auto as auto
        except ImportError:
            raise _unsupported("has no quantizer registry (diffusers.quantizers.auto)") from None
    quantizers = getattr(auto, "AUTO_QUANTIZER_MAPPING", None)
    configs = getattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING", None)
    if not isinstance(quantizers, dict) or not isinstance(configs, dict):
        raise _unsupported("has no AUTO_QUANTIZER_MAPPING / AUTO_QUANTIZATION_CONFIG_MAPPING")
    config_cls, quantizer_cls = _classes()
    for mapping, cls in ((configs, config_cls), (quantizers, quantizer_cls)):
        taken = mapping.get(MpqMethod.MPQ.value)
        if taken is not None and taken is not cls:
            raise MpqError(
                f"diffusers' quant_method 'mpq' is already {taken.__module__}.{taken.__qualname__}; mpq exports "
                f"cannot load with from_pretrained next to it: {_FALLBACK}"
            )
    configs[MpqMethod.MPQ.value] = config_cls
    quantizers[MpqMethod.MPQ.value] = quantizer_cls


def _register_quietly() -> None:
    """:func:`register` from an import hook: an unsupported diffusers must still import (loading an export then
    says why)."""
    try:
        register()
    except (MpqError, ImportError, AttributeError, TypeError):
        pass


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after ``diffusers.quantizers.auto`` has executed (its loader's ``exec_module``
    is wrapped for that one module); removes itself from ``sys.meta_path`` when it fires."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _AUTO:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            _register_quietly()

        loader.exec_module = exec_and_register  # this module's own loader object
        return spec


def register_on_import() -> None:
    """:func:`register` now if diffusers' quantizer registry is imported, else as soon as it is (``import mpq``
    calls this; no diffusers import of its own)."""
    if _AUTO in sys.modules:
        _register_quietly()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


__all__ = ["SUPPORTED", "MpqMethod", "register", "register_on_import"]
