"""Untrusted files: code-running pickles are refused; truncated, corrupted or foreign files
give a clear error; loading never executes anything from the file."""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from competitive import CompetitiveMixture
from vmonf import VMoNF
from vmonf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


class RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: what a malicious file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    X = np.random.default_rng(0).normal(size=(100, 2))
    model = VMoNF(2, max_epochs=1, n_layers=2, hidden_features=8, init_steps=5, random_state=0)
    return model.fit(X).save(tmp_path_factory.mktemp("model") / "model.pt")


def evil_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    files = {}
    raw = tmp_path / "raw.pkl"  # a plain pickle stream
    raw.write_bytes(pickle.dumps({"vmonf_format": "VMoNF", "x": RunsCode(marker)}))
    files["raw pickle"] = raw
    archive = tmp_path / "archive.pt"  # torch's own format with a hostile object inside
    torch.save({"vmonf_format": "VMoNF", "x": RunsCode(marker)}, archive)
    files["torch archive"] = archive
    # Our wrapper around a hostile inner archive (with a correct checksum).
    inner = io.BytesIO()
    torch.save({"params": RunsCode(marker)}, inner)
    data = torch.frombuffer(bytearray(inner.getvalue()), dtype=torch.uint8)
    wrapped = tmp_path / "wrapped.pt"
    digest = hashlib.sha256(inner.getvalue()).hexdigest()
    torch.save({"vmonf_format": "VMoNF", "sha256": digest, "payload": data}, wrapped)
    files["hostile content, valid checksum"] = wrapped
    return files


@pytest.mark.parametrize("loader", [VMoNF.load, CompetitiveMixture.load], ids=["vmonf", "comp"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, loader):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(RunsCode(marker)))  # the payload works when unpickled...
    assert marker.exists()
    marker.unlink()
    for name, path in evil_files(tmp_path, marker).items():
        with pytest.raises(
            CheckpointError, match=r"unsafe|does not hold|not a torch archive"
        ) as refused:
            loader(path)
        assert "can still be loaded" not in str(refused.value)  # no advice to load it anyway
        assert not marker.exists(), f"{name}: code ran on load"


def test_a_file_of_another_kind_is_named_as_such_not_as_unsafe(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("garbage")
    with pytest.raises(CheckpointError, match="not a torch archive") as refused:
        VMoNF.load(text)
    assert "unsafe" not in str(refused.value)


def test_truncated_files_are_refused(model_file, tmp_path):
    data = model_file.read_bytes()
    for keep in (0, 10, len(data) // 3, len(data) - 100):
        cut = tmp_path / f"cut{keep}.pt"
        cut.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=r"not a loadable|corrupted|damaged"):
            VMoNF.load(cut)


def test_every_corrupted_byte_is_caught_or_harmless(model_file, tmp_path):
    """Flip bytes all over the file: each load either fails with CheckpointError or gives
    exactly the original model (the byte was padding); never silently different weights."""
    data = bytearray(model_file.read_bytes())
    original = load_checkpoint(model_file, "VMoNF")["model"]
    rng = np.random.default_rng(0)
    failures = 0
    for position in rng.choice(len(data), size=60, replace=False):
        corrupted = bytearray(data)
        corrupted[position] ^= 0xFF
        path = tmp_path / "flipped.pt"
        path.write_bytes(bytes(corrupted))
        try:
            loaded = load_checkpoint(path, "VMoNF")["model"]
        except CheckpointError:
            failures += 1
            continue
        for key, value in original.items():
            assert torch.equal(loaded[key], value), f"byte {position} changed {key} silently"
    assert failures > 40


def test_foreign_files_are_refused(model_file, tmp_path):
    with pytest.raises(CheckpointError, match="does not hold a CompetitiveMixture"):
        CompetitiveMixture.load(model_file)  # a VMoNF file
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)  # someone else's torch file
    with pytest.raises(CheckpointError, match="does not hold a VMoNF"):
        VMoNF.load(plain)
    archive = tmp_path / "zip.pt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("hello.txt", "not torch")
    with pytest.raises(CheckpointError, match="not a loadable"):
        VMoNF.load(archive)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        VMoNF.load(tmp_path)  # a folder
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):  # as open() would
        VMoNF.load(tmp_path / "missing.pt")


def test_valid_file_with_wrong_content_gives_a_clear_error(tmp_path):
    path = save_checkpoint({"params": {"n_components": 2}}, tmp_path / "m.pt", "VMoNF")
    with pytest.raises(CheckpointError, match="incompatible VMoNF checkpoint"):
        VMoNF.load(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"fitted": None}, "incompatible"),
        ({"params": [1, 2]}, "holds no settings"),
        ({"fitted": {"_fitted_device": 1}}, "'_fitted_device' is not a fitted attribute"),
        ({"format": 99}, "format 99: this version of vmonf reads formats 1 to"),
        ({"format": "2"}, "format '2'"),
    ],
)
def test_hand_edited_model_files_raise_checkpoint_errors(model_file, tmp_path, edit, match):
    payload = {**load_checkpoint(model_file, "VMoNF"), **edit}
    edited = save_checkpoint(payload, tmp_path / "edited.pt", "VMoNF")  # a valid checksum
    with pytest.raises(CheckpointError, match=match):
        VMoNF.load(edited)


def test_saving_to_a_directory_or_under_a_file_gives_a_clear_error(tmp_path):
    payload = {"x": torch.zeros(2)}
    with pytest.raises(ValueError, match="must name a file, got the directory"):
        save_checkpoint(payload, tmp_path, "test")
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(ValueError, match="part of its folder is a file"):
        save_checkpoint(payload, tmp_path / "plain" / "model.pt", "test")
    with pytest.raises(ValueError, match="must name a file, got the directory"):
        save_checkpoint(payload, f"{tmp_path}/newdir/", "test")  # once a file named newdir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # nothing left behind
