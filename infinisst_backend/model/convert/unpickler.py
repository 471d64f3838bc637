"""Restricted unpickling of the fairseq wav2vec 2.0 checkpoint.

The ``.pt`` is a pickle that names fairseq's config classes. It is read without fairseq by an unpickler that builds
only tensors, containers and inert stand-ins for config objects, and refuses any other global: loading it never
runs code from the file. :func:`plain` turns the stand-ins into plain dicts, lists and scalars.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import tarfile
import types
import zipfile
from pathlib import Path

import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global that a checkpoint of tensors and configs never needs."""


class _Stub:
    """Inert stand-in for a class or function a fairseq pickle names (``argparse.Namespace``, omegaconf
    containers and nodes, enums, dataclass types, numpy scalars). It records the arguments and state the pickle
    gives it and never runs any code of the object it stands for; :func:`plain` turns it into plain data."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass  # the arguments were recorded by __new__ (REDUCE calls both, NEWOBJ only __new__)

    def __setstate__(self, state):  # BUILD
        self.state = state

    def __setitem__(self, key, value):  # SETITEMS on a dict subclass
        self.items.append((key, value))

    def append(self, value):  # APPENDS on a list subclass
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)


_STUB_CLASSES: dict[str, type[_Stub]] = {}
# Modules whose globals become inert stubs: where fairseq's configs, enums and bookkeeping objects live.
_STUB_MODULES = ("omegaconf", "typing", "fairseq", "fairseq_cli", "hydra", "numpy", "enum", "pathlib", "__main__")
_STUB_NAMES = {("argparse", "Namespace"), ("operator", "getitem")}  # getitem: how typing generics pickle
# Real globals that are safe to call with any arguments: tensor rebuilding and plain containers.
_REAL_NAMES = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("_codecs", "encode"),  # how protocol-2 pickles store bytes
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
} | {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool", "bytes")}


def _stub_class(qualified_name: str) -> type[_Stub]:
    if qualified_name not in _STUB_CLASSES:
        name = qualified_name.rsplit(".", 1)[-1]
        _STUB_CLASSES[qualified_name] = type(name, (_Stub,), {"qualified_name": qualified_name})
    return _STUB_CLASSES[qualified_name]


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose only globals are those listed above; torch's storage classes are resolved by
    ``torch.load``'s own wrapper before they reach :meth:`find_class`."""

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles name Python 2 modules (__builtin__.unicode, copy_reg, ...): map them as pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _REAL_NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _STUB_NAMES or module.split(".")[0] in _STUB_MODULES:
            return _stub_class(f"{module}.{name}")
        raise UnsafePickleError(
            f"the pickle references {module}.{name}, which a checkpoint of tensors and configs never needs; "
            "refusing to load it (the file is corrupt, or not what it claims to be)"
        )


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) takes a module-like object with Unpickler and load.
_RESTRICTED_PICKLE = types.ModuleType("infinisst_restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler
_RESTRICTED_PICKLE.load = _restricted_load


def plain(obj, depth: int = 0):
    """Plain dicts/lists/scalars from unpickled config objects (Namespace, omegaconf containers, enums).

    omegaconf containers keep their entries in ``_content`` and value nodes their value in ``_val``; an enum
    member is pickled as a call ``Enum(value)``. Other stubs (metadata, types) become None.
    """
    if depth > 64:
        raise ValueError("config nested more than 64 levels deep")
    if isinstance(obj, _Stub):
        return _plain_stub(obj, depth)
    if isinstance(obj, dict):
        return {k: plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v, depth + 1) for v in obj]
    return obj


def _plain_stub(obj: _Stub, depth: int):
    state = obj.state
    if obj.qualified_name == "argparse.Namespace" and isinstance(state, dict):
        return plain(state, depth + 1)
    if isinstance(state, dict) and "_content" in state:  # DictConfig / ListConfig ("???" = missing)
        content = state["_content"]
        return None if content == "???" else plain(content, depth + 1)
    if isinstance(state, dict) and "_val" in state:  # AnyNode, StringNode, IntegerNode, EnumNode, ...
        return plain(state["_val"], depth + 1)
    if obj.items:
        if all(isinstance(item, tuple) and len(item) == 2 for item in obj.items):
            return {k: plain(v, depth + 1) for k, v in obj.items}
        return [plain(v, depth + 1) for v in obj.items]
    if len(obj.args) == 1 and state is None:  # Enum(value)
        return plain(obj.args[0], depth + 1)
    return None


def load_restricted(path: Path):
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        with zipfile.ZipFile(path) as archive:
            if any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist()):
                raise ValueError(f"{path} is a TorchScript archive, not a checkpoint; refusing to load it")
    elif tarfile.is_tarfile(path):
        raise ValueError(f"{path} uses torch's pre-1.0 tar format; re-save it with a recent torch")
    try:
        return torch.load(path, map_location="cpu", pickle_module=_RESTRICTED_PICKLE, weights_only=False, mmap=is_zip)
    except UnsafePickleError as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # corrupt or truncated file: torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from e
