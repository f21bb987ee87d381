"""Files from strangers: crafted inputs end within seconds, in one line, and never block a job for good.

Each case is built here, run as a user would (a subprocess with a deadline), and must end fast with its one line.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_train import child_env

ROOT = Path(__file__).resolve().parents[1]
EDF = ROOT / "labram_jax" / "sample_data" / "eegmat" / "Subject00_2.edf"


# Runs a command and appends its peak memory (the largest of it and the processes it waited for) to stderr. The
# command is a child of this small process: ru_maxrss, which an exec keeps from the process that forked, is then
# its own.
_PEAK = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
         "sys.stderr.write(f'peak_mb {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f}\\n'); "
         "sys.exit(done.returncode)")


def measured(command: list[str], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """subprocess.run's result, with the command's own peak memory in MB as `.peak_mb` (its last stderr line,
    taken off)."""
    done = subprocess.run([sys.executable, "-c", _PEAK, *command], cwd=cwd, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)
    *lines, last = done.stderr.splitlines(keepends=True)
    done.stderr, done.peak_mb = "".join(lines), float(last.split()[1])
    return done


def labram(*words: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return measured([sys.executable, "-m", "labram_jax.cli", *words], cwd=cwd, timeout=timeout)


# -- inputs that hang ---------------------------------------------------------------------------------------------
def test_prep_never_opens_a_fifo_and_its_globs_do_not_follow_links(tmp_path):
    """A FIFO named like a recording or a BrainVision header is listed as skipped, never opened (opening it would
    wait for a writer forever); `in/**/*.edf` over links back to `in` finds each recording once."""
    data = tmp_path / "in"
    data.mkdir()
    shutil.copy(EDF, data / "real.edf")
    os.mkfifo(data / "x.edf")
    os.mkfifo(data / "y.vhdr")
    done = labram("prep", "in", "--out", "o", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    skipped = {Path(e["path"]).name: e["reason"] for e in report["recordings"] if e["status"] == "skipped"}
    assert skipped["x.edf"] == skipped["y.vhdr"] == "not a regular file (a FIFO): never opened"
    assert report["totals"]["written"] == 1

    os.unlink(data / "x.edf")
    os.unlink(data / "y.vhdr")
    os.symlink(".", data / "a")
    os.symlink(".", data / "b")
    tic = time.monotonic()
    done = labram("prep", "in/**/*.edf", "--out", "g", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - tic < 60
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    assert [e["recording"] for e in report["recordings"]] == ["real.edf"]


def test_train_refuses_a_fifo_named_like_a_shard(tmp_path, synthetic):
    shards = tmp_path / "train"
    shutil.copytree(synthetic / "train", shards)
    os.mkfifo(shards / "d-00000.array_record")
    done = measured([sys.executable, str(ROOT / "experiments" / "finetune_eegmat.py"), "--workdir",
                     str(tmp_path / "w"), "--data", str(shards), "--set", "train.steps=2", "model.depth=1"])
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        f"error: {shards / 'd-00000.array_record'}: not a regular file (a FIFO)"


STOPPED_POOL = """
import sys, time
from data_prep.pool import ordered_map
deadline = time.monotonic() + 1
def poll():
    if time.monotonic() > deadline:
        raise KeyboardInterrupt
try:
    list(ordered_map(time.sleep, [1000], 1, lambda item, why: None, poll=poll))
except KeyboardInterrupt:
    print("stopped", flush=True)
"""


def test_a_stopped_pool_ends_workers_blocked_for_good(tmp_path):
    """A stop (poll raises) while a worker is busy for good (here asleep; in a job, opening a file that never
    answers): the job's process exits within seconds. Before, the interpreter's exit joined the pool's threads,
    which waited for the worker: the job printed that it stopped and ran on."""
    tic = time.monotonic()
    done = subprocess.run([sys.executable, "-c", STOPPED_POOL], env=child_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "stopped", done.stderr[-2000:]
    assert time.monotonic() - tic < 30


@pytest.mark.parametrize("planted", [".lock", ".progress-00000-of-00001.jsonl"])
def test_prep_does_not_write_through_a_link_planted_in_its_output(tmp_path, planted):
    out = tmp_path / "o"
    out.mkdir()
    target = tmp_path / "elsewhere"
    os.symlink(target, out / planted)
    done = labram("prep", str(EDF), "--out", "o", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"labram prep: o/{planted}: a symbolic link, not followed (this "
                                                "job writes its own file there): remove it"]
    assert not target.exists()


# -- checkpoints that would allocate without limit, or escape the one-line error -----------------------------------
P2 = b"\x80\x02"


def _long(value: int) -> bytes:  # LONG1
    data = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _tensor(size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """torch._utils._rebuild_tensor_v2 over FloatStorage '0' of 4 elements, at `size` and `stride`."""
    def ints(values):
        return b"(" + b"".join(_long(v) for v in values) + b"t"
    return (b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
            b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00" + ints(size) + ints(stride)
            + b"\x89ccollections\nOrderedDict\n)RtR")


def _state_dict(tensor: bytes) -> bytes:
    return P2 + b"}X\x05\x00\x00\x00model}X\x01\x00\x00\x00w" + tensor + b"ss."


def _pth(path: Path, pickled: bytes, storage: bytes = b"\0" * 16, compress: int = 0, spread: int = 1) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickled)
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = compress
        with zf.open(info, "w", force_zip64=spread > 1) as f:
            for _ in range(spread):
                f.write(storage)


def _safetensors(path: Path, header: dict, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _f32(shape: list[int], start: int = 0) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, start + 4 * int(np.prod(shape))]}


def _export(path: Path, **config) -> None:
    base = {"embed_dim": 200, "depth": 12, "num_heads": 10, "out_chans": 8}
    path.mkdir()
    (path / "labram.json").write_text(json.dumps({"format": "labram-jax/params", "version": 2, "kind": "classify",
                                                  "config": base | config}))


CRAFTED = {  # name: (how to make it, what its one line says)
    "codecs.pth": (lambda p: _pth(p, P2 + b"c_codecs\nencode\nK\x01K\x02\x86R."), "_codecs.encode of int"),
    "persistent.pth": (lambda p: _pth(p, P2 + b"K\x05Q."), "persistent record 5 is not a (storage"),
    "nested.pth": (lambda p: _pth(p, P2 + b")" + b"\x85" * 1_000_000 + b"."), "no state dict found"),
    "getattr.pth": (lambda p: _pth(p, P2 + b"c__builtin__\ngetattr\nK\x01X\x04\x00\x00\x00real\x86R."),
                    "no state dict found"),
    "stride.pth": (lambda p: _pth(p, _state_dict(_tensor((2, 2), (2 ** 70, 1)))), "lies outside its storage"),
    "repeated.pth": (lambda p: _pth(p, _state_dict(_tensor((500_000_000,), (0,)))),
                     "tensor view of size (500000000,) has more elements than its storage of 4"),
    "bytearray.pth": (lambda p: _pth(p, P2 + b"c__builtin__\nbytearray\n" + _long(3_000_000_000) + b"\x85R."),
                      "bytearray() of 3,000,000,000 items, more than its"),
    "range.pth": (lambda p: _pth(p, P2 + b"c__builtin__\nlist\nc__builtin__\nrange\n" + _long(10 ** 8)
                                 + b"\x85R\x85R."), "list() of 100,000,000 items"),
    "bytes8.pth": (lambda p: _pth(p, b"\x80\x04\x8e" + (10 ** 12).to_bytes(8, "little") + b"xx"),
                   "expected 1000000000000 bytes in a bytes8"),
    # 256 MiB of zeros in a 200 KB bzip2 member, for a tensor of 4 floats
    "bomb.pth": (lambda p: _pth(p, _state_dict(_tensor((2, 2), (2, 1))), b"\0" * 2 ** 26, 12, 4),
                 "record archive/data/0 declares 268,435,456 bytes, its tensors need 16"),
    "float8.safetensors": (lambda p: _safetensors(p, {"cls_token": {"dtype": "F8_E4M3", "shape": [1, 1, 4],
                                                                    "data_offsets": [0, 4]}}, b"\0" * 4),
                           "tensor 'cls_token' has dtype 'F8_E4M3'"),
    "empty.safetensors": (lambda p: _safetensors(p, {"cls_token": _f32([0, 1, 4000]),
                                                     "blocks.0.mlp.fc1.weight": _f32([16000, 0]),
                                                     "blocks.99.x": _f32([0])}),
                          "cls_token has shape (0, 1, 4000), not (1, 1, embed_dim)"),
    "heads.safetensors": (lambda p: _safetensors(p, {"cls_token": _f32([1, 1, 4]), "blocks.0.mlp.fc1.weight":
                                                     _f32([8, 4], 16), "blocks.0.attn.q_norm.weight": _f32([8], 144)},
                                                 b"\0" * 176), "a head of 8 features does not divide embed_dim 4"),
    "digits.safetensors": (lambda p: _safetensors(p, {"cls_token": _f32([1, 1, 4]), "blocks.0.mlp.fc1.weight":
                                                      _f32([8, 4], 16), f"blocks.{'9' * 5000}.x": _f32([1], 144)},
                                                  b"\0" * 148), "a block number of 5000 digits"),
    "huge_export": (lambda p: _export(p, embed_dim=4000, depth=100, out_chans=160),
                    "describes a model of 19,2"),
    "headless_export": (lambda p: _export(p, num_heads=0), "num_heads must be an integer of at least 1, not 0"),
}
# `labram` commands run one after another in one process (a process each would cost its imports): each one's exit
# status, stderr and time, and the process's peak memory.
HARNESS = """
import contextlib, io, json, sys, time
from labram_jax.cli import main
results = []
for words in json.loads(sys.argv[1]):
    err, tic = io.StringIO(), time.monotonic()
    with contextlib.redirect_stderr(err):
        code = main(words)
    results.append([code, err.getvalue(), time.monotonic() - tic])
# VmHWM: this process's own peak (getrusage's ru_maxrss keeps, across exec, the peak of the forking process)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"results": results, "peak_mb": peak / 1024}))
"""


def commands_in_one_process(commands: list[list[str]], cwd: Path) -> tuple[list, float]:
    """([exit status, stderr, seconds] per `labram` command, peak memory in MB), run by HARNESS."""
    done = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(commands)], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    return report["results"], report["peak_mb"]


def assert_one_line(results: list, expected: list[tuple[str, str]]) -> None:
    """Each command ended with exit 2 within seconds, its stderr one line holding both strings."""
    for (code, err, seconds), (name, says) in zip(results, expected, strict=True):
        assert code == 2 and err.count("\n") == 1 and says in err and name in err, (name, code, err)
        assert seconds < 20, (name, seconds)


def test_crafted_checkpoints_end_in_one_line_with_bounded_memory(tmp_path):
    """Each file is a few bytes to a megabyte that asked for gigabytes, or raised a traceback, before: each now
    ends within seconds with exit 2 and one line naming it, and the process that read them all stayed small."""
    for name, (make, _) in CRAFTED.items():
        make(tmp_path / name)
    results, peak_mb = commands_in_one_process([["convert", name, name + ".out.safetensors"] for name in CRAFTED],
                                               tmp_path)
    assert_one_line(results, [(name, says) for name, (_, says) in CRAFTED.items()])
    assert peak_mb < 600, peak_mb


# -- data that escaped the one-line error --------------------------------------------------------------------------
def test_bad_manifests_shards_and_recordings_end_in_one_line(tmp_path, synthetic):
    """Manifests that are not JSON objects or hold impossible fields, a garbage or truncated shard, and `labram
    embed` of files that are no recording (garbage, a folder, a looping link named .edf): exit 2, one line."""
    from labram_jax.checkpoint import save_model
    from labram_jax.models.labram import LaBraM
    from labram_jax import configs
    from flax import nnx

    good = json.loads((synthetic / "train" / "manifest.json").read_text())
    manifests = {"text": "not json", "list": "[1, 2]", "infinite": json.dumps(good).replace('"windows": 32',
                                                                                          '"windows": Infinity'),
                 "string": json.dumps(good | {"windows": "16"}),
                 "long_window": json.dumps(good | {"preprocessing": {"window_s": 10 ** 9}}),
                 "wide": json.dumps(good | {"channel_sets": {" ".join(f"E{i}" for i in range(200_000)): 32}})}
    says = {"text": "not a manifest: Expecting value", "list": "not a manifest (a JSON list, not an object)",
            "infinite": "not a manifest: Infinity is not JSON", "string": "windows is '16', not a count",
            "long_window": "preprocessing's window is 1000000000, not 1 to 600 seconds",
            "wide": "channel_sets holds a set of 200000 channels; a window has 1 to 128"}
    commands, expected = [], []
    for name, text in manifests.items():
        folder = tmp_path / name
        shutil.copytree(synthetic / "train", folder)
        (folder / "manifest.json").write_text(text)
        commands.append(_finetune(tmp_path, folder))
        expected.append((name, says[name]))
    for name, content in (("garbage", os.urandom(5000)), ("truncated", None)):
        folder = tmp_path / name
        shutil.copytree(synthetic / "train", folder)
        shard = folder / "syn-00000.array_record"
        shard.write_bytes(content if content is not None else shard.read_bytes()[:len(shard.read_bytes()) // 2])
        commands.append(_finetune(tmp_path, folder))
        expected.append((name, f"{shard}: not a readable ArrayRecord shard"))

    model = save_model(LaBraM(configs.tiny(), rngs=nnx.Rngs(0)), tmp_path / "model")
    (tmp_path / "garbage.edf").write_bytes(os.urandom(3000))
    (tmp_path / "folder.edf").mkdir()
    os.symlink("loop.edf", tmp_path / "loop.edf")
    for name in ("garbage.edf", "folder.edf", "loop.edf"):
        commands.append(["embed", str(model), name, "--out", "e.npz"])
        expected.append((name, "cannot read as an EEG recording"))
    results, peak_mb = commands_in_one_process(commands, tmp_path)
    assert_one_line(results, expected)
    assert peak_mb < 600, peak_mb


def _finetune(tmp_path: Path, data: Path) -> list[str]:
    return ["train", "finetune_eegmat", "--workdir", str(tmp_path / f"w_{data.name}"), "--data", str(data), "--set",
            "train.steps=2", "model.depth=1", "data.max_channels=4", "data.max_patches=2"]


def test_the_size_limit_is_a_setting(tmp_path, monkeypatch):
    from labram_jax import configs
    from labram_jax.errors import UserError

    with pytest.raises(UserError, match=r"describes a model of 7,4\d\d,\d\d\d parameters, more than the 1,000,000 "
                                        r"this reader builds \(set LABRAM_JAX_MAX_PARAMETERS to build it\)"):
        monkeypatch.setenv("LABRAM_JAX_MAX_PARAMETERS", "1000000")
        configs.check_size(configs.base(), "x")
    monkeypatch.setenv("LABRAM_JAX_MAX_PARAMETERS", "3000000000")
    configs.check_size(configs.huge(depth=300), "x")  # 2.3 billion: over the default, under this limit
    monkeypatch.setenv("LABRAM_JAX_MAX_PARAMETERS", "lots")
    with pytest.raises(UserError, match="LABRAM_JAX_MAX_PARAMETERS='lots' is not a whole number"):
        configs.check_size(configs.base(), "x")
