"""Read and write PyTorch ``.pth`` checkpoints (torch >= 1.6 zip format) without importing torch.

Such a checkpoint is an uncompressed zip holding ``<prefix>/data.pkl``, a protocol-2 pickle in which every tensor is
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` over a persistent storage id
``('storage', torch.FloatStorage, key, location, numel)``, plus one raw record ``<prefix>/data/<key>`` per storage.
"""
from __future__ import annotations

import builtins
import collections
import io
import lzma
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from typing import IO, Any

import ml_dtypes
import numpy as np

from labram_jax.errors import UserError, one_line
from labram_jax.files import check_regular, replace_atomically

_STORAGES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_STORAGE_OF = {np.dtype(t): name for name, t in _STORAGES.items()}
_SAFE_BUILTINS = {'bool', 'bytearray', 'bytes', 'complex', 'dict', 'float', 'frozenset', 'int', 'list', 'range',
                  'set', 'slice', 'str', 'tuple'}
_ALIGN = 64
_ORDERED_DICT = b'ccollections\nOrderedDict\n)R'  # GLOBAL + EMPTY_TUPLE + REDUCE: a fresh OrderedDict()


class Placeholder:
    """Inert stand-in for a pickled global that ``read_pth`` does not import (``argparse.Namespace``, ...).

    ``qualname`` names the global; constructor args, pickled state and set items are kept as plain data.
    """

    qualname = ''

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        self = super().__new__(cls)
        self.args, self.state, self.entries = args, None, {}
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.entries[key] = value

    def __repr__(self) -> str:
        return f'<{self.qualname} (not imported)>'


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    shape, strides = tuple(size), tuple(stride)
    if not (isinstance(storage, np.ndarray) and all(isinstance(v, int) for v in (offset, *shape, *strides))
            and len(shape) == len(strides) and min(shape, default=0) >= 0):
        raise UserError(f'a tensor record that is not (storage, offset, size, stride): {offset!r}, {shape!r}, '
                        f'{strides!r}')
    if 0 not in shape:  # as_strided reads raw memory, so a corrupt view must be stopped before it
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if offset < 0 or min(strides, default=0) < 0 or last >= storage.size:
            raise UserError(f'tensor view (offset {offset}, size {shape}, stride {strides}) '
                            f'lies outside its storage of {storage.size} elements')
        # A view repeating its storage (stride 0) would copy more than the file holds: a tiny file, any size.
        if math.prod(shape) > storage.size:
            raise UserError(f'tensor view of size {shape} has more elements than its storage of {storage.size}')
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape, [s * storage.itemsize for s in strides])
    return np.array(view, dtype=storage.dtype.newbyteorder('='), order='C')


def _latin1(text: str, _encoding: str) -> bytes:  # how protocol 2 pickles bytes: _codecs.encode(text, 'latin1')
    if not isinstance(text, str):
        raise UserError(f'_codecs.encode of {type(text).__name__}, not of a str')
    return text.encode('latin1')


_ALLOWED = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): lambda data, *_: data,
    ('torch._utils', '_rebuild_parameter_with_state'): lambda data, *_: data,
    ('torch._tensor', '_rebuild_from_type_v2'): lambda func, _type, args, _state: func(*args),
    ('torch', 'Size'): tuple,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('_codecs', 'encode'): _latin1,
}
# What a crafted pickle can raise through the calls it is allowed (builtins, the tensor rebuild) and the opcodes
# themselves: read_pth turns these into one line. Anything else is a bug of ours and keeps its traceback.
_CRAFTED = (ValueError, TypeError, AttributeError, KeyError, IndexError, EOFError, OverflowError, RecursionError,
            pickle.UnpicklingError, struct.error, zlib.error, lzma.LZMAError, NotImplementedError, OSError)
PICKLE_MAX_BYTES = 256 * 2 ** 20  # a state dict's pickle is its keys and tensor records: a base model's is 60 KB


def _bounded(fn: Any, limit: int) -> Any:
    """A builtin as a pickle may call it, refusing to make anything larger than the pickle that asks for it
    (bytearray(3e9), list(range(1e8)): a few bytes of pickle, gigabytes of memory)."""
    def call(*args: Any) -> Any:
        for arg in args:
            size = arg if isinstance(arg, int) and fn in (bytes, bytearray) else \
                len(arg) if isinstance(arg, range) else 0
            if size > limit:
                raise UserError(f'{fn.__name__}() of {size:,} items, more than its {limit:,}-byte pickle holds')
        return fn(*args)
    return call


def _member(zf: zipfile.ZipFile, name: str, size: int, exact: bool = True) -> bytes:
    """A zip member's bytes, `size` of them (at most, unless `exact`), read through a bounded reader: its header's
    sizes are the file's word, and a compressed member may expand far beyond them."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise UserError(f'missing record {name}') from None
    if info.file_size > size or (exact and info.file_size < size):
        raise UserError(f'record {name} declares {info.file_size:,} bytes, ' +
                        (f'its tensors need {size:,}' if exact else f'more than the {size:,} allowed'))
    with zf.open(info) as f:
        data = f.read(size + 1)
    if len(data) != info.file_size:
        raise UserError(f'record {name} holds {len(data):,} bytes, its header says {info.file_size:,}')
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], zf: zipfile.ZipFile, prefix: str, size: int):
        super().__init__(file)
        self._zf, self._prefix, self._storages, self._size = zf, prefix, {}, size
        big = prefix + 'byteorder' in zf.namelist() and _member(zf, prefix + 'byteorder', 8, exact=False) == b'big'
        self._order = '>' if big else '<'

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == 'torch' and name in _STORAGES:
            return np.dtype(_STORAGES[name])
        if module in ('builtins', '__builtin__') and name in _SAFE_BUILTINS:
            return _bounded(getattr(builtins, name), self._size)
        return type(name, (Placeholder,), {'qualname': f'{module}.{name}'})

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise UserError(f'persistent record {pid!r} is not a (storage, type, key, location, size) tuple')
        kind, dtype, key, _location, numel = pid
        if kind != 'storage' or not isinstance(dtype, np.dtype) or not isinstance(key, str) \
                or not isinstance(numel, int) or numel < 0:
            raise UserError(f'unsupported persistent record {kind!r} of type {dtype!r}, key {key!r}, size {numel!r}')
        if key not in self._storages:
            raw = _member(self._zf, f'{self._prefix}data/{key}', numel * dtype.itemsize)
            self._storages[key] = np.frombuffer(raw, dtype.newbyteorder(self._order), count=numel)
        return self._storages[key]


def read_pth(path: str | os.PathLike) -> Any:
    """Load a torch zip checkpoint, with every tensor as a fresh numpy array; no code from the file is run.

    Globals other than torch's tensor machinery and plain containers come back as ``Placeholder`` objects.
    """
    name = os.fspath(path)
    check_regular(name)
    try:
        with zipfile.ZipFile(name) as zf:
            pickles = [n for n in zf.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
            if not pickles:
                raise UserError('no <prefix>/data.pkl record')
            data = _member(zf, pickles[0], PICKLE_MAX_BYTES, exact=False)
            # Every opcode's length checked against the bytes there (a BYTES8 claiming a terabyte would otherwise
            # be allocated before it is read), nothing built.
            for _ in pickletools.genops(data):
                pass
            return _Unpickler(io.BytesIO(data), zf, pickles[0][:-len('data.pkl')], len(data)).load()
    except UserError as e:
        raise UserError(f'{name}: {one_line(e)}') from None
    except zipfile.BadZipFile as e:
        raise UserError(f'{name}: not a PyTorch zip checkpoint (legacy or corrupt file: {e})') from None
    except _CRAFTED as e:
        raise UserError(f'{name}: unreadable checkpoint: {type(e).__name__}: {one_line(e)}') from None


def _int(v: int) -> bytes:
    if 0 <= v < 1 << 8:
        return b'K' + bytes([v])
    if 0 <= v < 1 << 16:
        return b'M' + struct.pack('<H', v)
    if -1 << 31 <= v < 1 << 31:
        return b'J' + struct.pack('<i', v)
    data = v.to_bytes(v.bit_length() // 8 + 1, 'little', signed=True)
    return b'\x8a' + bytes([len(data)]) + data


def _emit(obj: Any, out: bytearray, arrays: list[np.ndarray]) -> None:
    """Append the protocol-2 opcodes of ``obj`` to ``out``; tensors' arrays go to ``arrays`` (key = index)."""
    if obj is None:
        out += b'N'
    elif isinstance(obj, bool):
        out += b'\x88' if obj else b'\x89'
    elif isinstance(obj, int):
        out += _int(obj)
    elif isinstance(obj, float):
        out += b'G' + struct.pack('>d', obj)
    elif isinstance(obj, str):
        data = obj.encode('utf-8', 'surrogatepass')
        out += b'X' + struct.pack('<I', len(data)) + data
    elif isinstance(obj, dict):
        out += _ORDERED_DICT if isinstance(obj, collections.OrderedDict) else b'}'
        if obj:
            _emit_marked([x for kv in obj.items() for x in kv], b'u', out, arrays)  # SETITEMS
    elif isinstance(obj, list):
        out += b']'
        if obj:
            _emit_marked(obj, b'e', out, arrays)  # APPENDS
    elif isinstance(obj, tuple):
        _emit_marked(obj, b't', out, arrays)
    elif hasattr(obj, '__array__'):
        _emit_tensor(np.asarray(obj), out, arrays)
    else:
        raise TypeError(f'write_pth cannot store {type(obj).__qualname__}')


def _emit_marked(items: Any, closing: bytes, out: bytearray, arrays: list[np.ndarray]) -> None:
    out += b'('
    for x in items:
        _emit(x, out, arrays)
    out += closing


def _emit_tensor(a: np.ndarray, out: bytearray, arrays: list[np.ndarray]) -> None:
    dtype = a.dtype.newbyteorder('<')
    if dtype not in _STORAGE_OF:
        supported = ', '.join(str(np.dtype(t)) for t in _STORAGES.values())
        raise ValueError(f'write_pth: unsupported dtype {a.dtype} (supported: {supported})')
    key = str(len(arrays))
    arrays.append(np.asarray(a, dtype=dtype, order='C'))
    strides, step = [], 1
    for n in reversed(a.shape):  # torch's contiguous strides treat empty dims as size 1
        strides.insert(0, step)
        step *= max(n, 1)
    out += b'ctorch._utils\n_rebuild_tensor_v2\n(('
    _emit('storage', out, arrays)
    out += f'ctorch\n{_STORAGE_OF[dtype]}\n'.encode()
    for x in (key, 'cpu', a.size):
        _emit(x, out, arrays)
    out += b'tQ'  # TUPLE, BINPERSID
    for x in (0, a.shape, tuple(strides), False):
        _emit(x, out, arrays)
    out += _ORDERED_DICT + b'tR'


def _write_zip(f: IO[bytes], records: list[tuple[str, Any]]) -> None:
    with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as zf:
        for name, data in records:
            info = zipfile.ZipInfo(f'archive/{name}')
            # torch.load(mmap=True) maps storages in place, so like torch pad the local header's extra field
            # (id "FB") until the data starts on a 64-byte boundary. zipfile adds a 20-byte zip64 field to that
            # header when its own rule (1.05 * size > ZIP64_LIMIT) says the record might outgrow 32-bit sizes.
            zip64 = memoryview(data).nbytes * 1.05 > zipfile.ZIP64_LIMIT
            start = f.tell() + 30 + len(info.filename.encode()) + 4 + (20 if zip64 else 0)
            pad = -start % _ALIGN
            info.extra = b'FB' + struct.pack('<H', pad) + b'Z' * pad
            zf.writestr(info, data)


def write_pth(path: str | os.PathLike, obj: Any) -> None:
    """Save ``obj`` (containers, scalars, strings, numpy arrays as tensors) so that
    ``torch.load(path, weights_only=True)`` reads it; ``path`` is replaced atomically.
    """
    out, arrays = bytearray(b'\x80\x02'), []
    _emit(obj, out, arrays)
    out += b'.'
    records = [('data.pkl', out), ('.format_version', b'1'), ('.storage_alignment', str(_ALIGN).encode()),
               ('byteorder', b'little'),
               *((f'data/{i}', a.reshape(-1).view(np.uint8)) for i, a in enumerate(arrays)), ('version', b'3\n')]
    replace_atomically(path, lambda f: _write_zip(f, records))

