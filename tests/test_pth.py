"""labram_jax.convert.pth against real torch: reading torch's files, and torch reading ours."""
import argparse
import collections
import io
import os
import pickletools
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from labram_jax.convert import pth
from labram_jax.convert.pth import Placeholder, read_pth, write_pth

REFERENCE = Path(__file__).parent / 'fixtures' / 'reference_tiny'


def assert_same(ours, theirs):
    """``ours`` (from read_pth) equals ``theirs`` (from torch.load) in structure, key order, dtype, shape, values."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, np.ndarray)
        assert str(ours.dtype) == str(theirs.dtype).removeprefix('torch.')
        assert ours.shape == tuple(theirs.shape)
        assert ours.flags.c_contiguous and ours.flags.owndata
        if theirs.dtype == torch.bfloat16:
            theirs, ours = theirs.view(torch.int16), ours.view(np.int16)
        np.testing.assert_array_equal(ours, theirs.numpy())
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs)
        assert list(ours) == list(theirs)
        for k in theirs:
            assert_same(ours[k], theirs[k])
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same(a, b)
    else:
        assert type(ours) is type(theirs) and ours == theirs


def data_offsets(path):
    """Where each record's data starts, read from the local headers as torch does."""
    raw = Path(path).read_bytes()
    offsets = {}
    for info in zipfile.ZipFile(path).infolist():
        name_len, extra_len = struct.unpack('<HH', raw[info.header_offset + 26:info.header_offset + 30])
        offsets[info.filename] = info.header_offset + 30 + name_len + extra_len
    return offsets


def rewrite(path, edit):
    """Rebuild the zip at ``path`` from ``edit({record name: bytes})``."""
    with zipfile.ZipFile(path) as zf:
        records = edit({n: zf.read(n) for n in zf.namelist()})
    with zipfile.ZipFile(path, 'w') as zf:
        for n, data in records.items():
            zf.writestr(n, data)


@pytest.mark.parametrize('name', ['finetune', 'pretrain', 'tokenizer'])
def test_reads_reference_checkpoints_like_torch(name):
    path = REFERENCE / f'{name}.pth'
    ours, theirs = read_pth(path), torch.load(path, map_location='cpu', weights_only=True)
    assert_same(ours, theirs)
    assert ours['model']._metadata == theirs['model']._metadata


def test_reads_training_checkpoint_with_foreign_objects(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / 'checkpoint.pth'
    tagged_param, tagged_tensor = torch.nn.Parameter(torch.ones(2)), torch.zeros(3)
    tagged_param.tag, tagged_tensor.note = 'x', 'y'  # attributes make torch use other rebuild functions
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 3,
                'args': argparse.Namespace(lr=0.1, layers=[1, 2]), 'scaler': {'scale': 65536.0, '_growth_tracker': 7},
                'device': torch.device('cpu'), 'best': np.float64(0.5), 'param': torch.nn.Parameter(torch.ones(2)),
                'size': torch.Size([2, 3]), 'blob': b'\x00\xff', 'tagged': [tagged_param, tagged_tensor]}, path)
    ours, theirs = read_pth(path), torch.load(path, weights_only=False)

    assert_same(ours['model'], theirs['model'])
    assert_same(ours['optimizer'], theirs['optimizer'])
    assert ours['epoch'] == 3 and ours['scaler'] == {'scale': 65536.0, '_growth_tracker': 7}
    assert isinstance(ours['args'], Placeholder) and ours['args'].qualname == 'argparse.Namespace'
    assert ours['args'].state == {'lr': 0.1, 'layers': [1, 2]}
    assert ours['device'].qualname == 'torch.device' and ours['device'].args == ('cpu',)
    assert isinstance(ours['best'], Placeholder)
    np.testing.assert_array_equal(ours['param'], np.ones(2, np.float32))
    assert ours['size'] == (2, 3) and ours['blob'] == b'\x00\xff'
    assert_same(ours['tagged'], [t.detach() for t in theirs['tagged']])


def test_reads_views_offsets_and_shared_storage(tmp_path):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    views = {'base': base, 'transposed': base.t(), 'slice': base[1:, 2:5], 'tail': base.view(-1)[7:],
             'column': base[:, 3], 'empty': base[4:]}
    path = tmp_path / 'views.pth'
    torch.save(views, path)
    assert sum('/data/' in n for n in zipfile.ZipFile(path).namelist()) == 1
    ours = read_pth(path)
    assert_same(ours, torch.load(path, weights_only=True))
    ours['transposed'][0, 0] = -1  # fresh arrays, not views of one another
    assert ours['base'][0, 0] == 0


def test_treats_cuda_location_as_cpu(tmp_path):
    path = tmp_path / 'cuda.pth'
    write_pth(path, {'w': np.arange(4, dtype=np.float32)})
    rewrite(path, lambda records: {**records, 'archive/data.pkl': records['archive/data.pkl'].replace(
        b'X\x03\x00\x00\x00cpu', b'X\x06\x00\x00\x00cuda:0')})
    np.testing.assert_array_equal(read_pth(path)['w'], np.arange(4, dtype=np.float32))


def test_reads_big_endian_storages(tmp_path):
    path = tmp_path / 'big.pth'
    weights = np.arange(6, dtype=np.int32).reshape(2, 3)
    write_pth(path, {'w': weights})
    rewrite(path, lambda records: {**records, 'archive/byteorder': b'big',
                                   'archive/data/0': weights.astype('>i4').tobytes()})
    back = read_pth(path)['w']
    assert back.dtype == np.int32 and back.dtype.isnative
    np.testing.assert_array_equal(back, weights)


def sample_tree():
    rng = np.random.default_rng(0)
    tensors = collections.OrderedDict(
        f32=rng.standard_normal((3, 4)).astype(np.float32),
        f64=rng.standard_normal(5),
        f16=rng.standard_normal((2, 2)).astype(np.float16),
        bf16=rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        i64=np.array([-2**62, 0, 2**62]),
        i32=np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
        i16=np.array([-32768, 32767], np.int16),
        i8=np.array([-128, 127], np.int8),
        u8=np.array([0, 255], np.uint8),
        bool=np.array([[True, False], [False, True]]),
        scalar=np.array(2.5, np.float32),
        empty=np.zeros((0, 3), np.float32),
        empty_last=np.zeros((2, 0), np.int64),
        strided=np.arange(12, dtype=np.float32).reshape(3, 4).T[::2],
        big_endian=np.arange(3, dtype='>i4'),
    )
    return {'model': tensors, 'epoch': 3, 'ints': [0, 255, 256, 65535, 65536, -1, 2**31, -2**31 - 1, 2**40, -2**70],
            'floats': (0.5, -1e300, float('inf')), 'flags': [True, False, None], 'name': 'läbram ✓',
            'nested': {'a': [{'b': ()}, (1,), []], 'c': collections.OrderedDict()}}


def to_torch(a):
    a = np.array(a, dtype=a.dtype.newbyteorder('='), order='C')
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def test_written_file_loads_in_torch(tmp_path):
    tree = sample_tree()
    path = tmp_path / 'out.pth'
    write_pth(path, tree)
    loaded = torch.load(path, map_location='cpu', weights_only=True)
    expected = {**tree, 'model': collections.OrderedDict((k, to_torch(v)) for k, v in tree['model'].items())}
    assert list(loaded) == list(expected)
    assert type(loaded['model']) is collections.OrderedDict and type(loaded['nested']['c']) is collections.OrderedDict
    for k, t in loaded['model'].items():
        assert t.dtype == expected['model'][k].dtype and t.shape == expected['model'][k].shape and t.is_contiguous()
        assert torch.equal(t, expected['model'][k]), k
    assert {k: v for k, v in loaded.items() if k != 'model'} == {k: v for k, v in tree.items() if k != 'model'}
    pickletools.dis(zipfile.ZipFile(path).read('archive/data.pkl'), out=io.StringIO())  # well-formed opcodes


def test_round_trip_and_alignment(tmp_path):
    tree = sample_tree()
    path = tmp_path / 'out.pth'
    write_pth(path, tree)
    back = read_pth(path)
    assert list(back) == list(tree) and type(back['model']) is collections.OrderedDict
    for k, v in tree['model'].items():
        assert back['model'][k].dtype == v.dtype.newbyteorder('=') and back['model'][k].shape == v.shape
        np.testing.assert_array_equal(back['model'][k], v)
    assert {k: v for k, v in back.items() if k != 'model'} == {k: v for k, v in tree.items() if k != 'model'}
    offsets = data_offsets(path)
    assert len(offsets) == 5 + len(tree['model'])
    assert all(offset % 64 == 0 for offset in offsets.values())
    assert os.listdir(tmp_path) == ['out.pth']


def test_alignment_survives_zip64_headers(tmp_path, monkeypatch):
    monkeypatch.setattr(zipfile, 'ZIP64_LIMIT', 1000)  # make a small record take zipfile's zip64 path
    path = tmp_path / 'zip64.pth'
    weights = np.arange(1000, dtype=np.float32)
    write_pth(path, {'w': weights})
    assert all(offset % 64 == 0 for offset in data_offsets(path).values())
    monkeypatch.undo()
    np.testing.assert_array_equal(torch.load(path, weights_only=True)['w'].numpy(), weights)
    np.testing.assert_array_equal(read_pth(path)['w'], weights)


def zip_without_pickle(path):
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('archive/version', '3\n')


def first_half_of_reference(path):
    data = (REFERENCE / 'tokenizer.pth').read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize('make', [
    lambda p: p.write_bytes(b'definitely not a checkpoint' * 10),
    first_half_of_reference,
    lambda p: torch.save({'w': torch.ones(2)}, p, _use_new_zipfile_serialization=False),
    zip_without_pickle,
], ids=['garbage', 'truncated', 'legacy', 'no-pickle'])
def test_unreadable_files_raise_one_line_value_error(tmp_path, make):
    path = tmp_path / 'broken_model.pth'
    make(path)
    with pytest.raises(ValueError, match='broken_model.pth') as info:
        read_pth(path)
    assert '\n' not in str(info.value)


def test_missing_storage_record_is_named(tmp_path):
    path = tmp_path / 'partial.pth'
    write_pth(path, {'w': np.ones(2, np.float32)})
    rewrite(path, lambda records: {n: data for n, data in records.items() if n != 'archive/data/0'})
    with pytest.raises(ValueError, match=r'partial\.pth.*archive/data/0'):
        read_pth(path)


@pytest.mark.parametrize('dtype', ['complex64', 'uint16', 'object'])
def test_unsupported_dtype_is_named_and_leaves_target_untouched(tmp_path, dtype):
    path = tmp_path / 'keep.pth'
    path.write_bytes(b'old')
    with pytest.raises(ValueError, match=dtype):
        write_pth(path, {'w': np.zeros(2, dtype)})
    assert path.read_bytes() == b'old' and os.listdir(tmp_path) == ['keep.pth']


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def crash(f, records):
        f.write(b'PK\x03\x04 half a file')
        raise KeyboardInterrupt

    monkeypatch.setattr(pth, '_write_zip', crash)
    path = tmp_path / 'model.pth'
    with pytest.raises(KeyboardInterrupt):
        write_pth(path, {'w': np.ones(3, np.float32)})
    assert os.listdir(tmp_path) == []
