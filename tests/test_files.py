"""The shared helpers every module writes files and reports errors through: atomic writes (labram_jax.files),
one-line messages and key-mismatch reports (labram_jax.errors)."""
import json
import os

import pytest

from labram_jax.errors import UserError, key_mismatch, one_line
from labram_jax.files import read_json_object, replace_atomically, write_json


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    write_json(path, {"µV": float("nan")}, ensure_ascii=False)
    assert path.read_text(encoding="utf-8").endswith("\n")
    assert list(json.loads(path.read_text(encoding="utf-8"))) == ["µV"] and os.listdir(tmp_path) == ["report.json"]


def test_interrupted_json_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "manifest.json"
    write_json(path, {"windows": 3})
    with pytest.raises(TypeError):  # not JSON: nothing may be written, and no temporary file stays behind
        write_json(path, {"windows": object()})

    def crash(f):
        f.write(b"{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(path, crash)
    assert json.loads(path.read_text()) == {"windows": 3} and os.listdir(tmp_path) == ["manifest.json"]


def test_one_line_folds_white_space_and_names_an_empty_error():
    assert one_line(ValueError("a\n  b\tc ")) == "a b c"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(OSError("x" * 50), limit=10) == "x" * 10


def test_key_mismatch_names_only_what_differs():
    assert key_mismatch({"a": (1,), "b": (2,)}, {"a": (1,), "b": (2,)}) == ""
    report = key_mismatch(have={"a": (1,), "c": (3,), "b": (2, 1)}, want={"a": (1,), "b": (2,), "d": (4,)})
    assert report == "missing: d; unexpected: c; wrong shape: b (2, 1) (expected (2,))"
    assert key_mismatch({}, {"w": 1}, allow_missing=("w",)) == ""
    many = key_mismatch({}, {f"k{i}": 1 for i in range(9)}, limit=3)
    assert many == "missing: k0, k1, k2 and 6 more"
    assert issubclass(UserError, ValueError)


def test_read_json_object_names_the_file_in_one_line(tmp_path):
    path = tmp_path / "meta.json"
    with pytest.raises(UserError, match=r"^no meta here$"):
        read_json_object(path, "no meta here", "a meta object")
    path.write_text('{"a": ')
    with pytest.raises(UserError, match=rf"^{path}: unreadable: Expecting value: line 1 column 7 \(char 6\)$"):
        read_json_object(path, "", "a meta object")
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match=rf"^{path}: not a meta object$"):
        read_json_object(path, "", "a meta object")
    path.write_text('{"a": 1}')
    assert read_json_object(path, "", "a meta object") == {"a": 1}
