"""tfds's prepared MNIST damaged, or $TFDS_DATA_DIR naming a file: for both trainers, one `error:`
line that names the folder or the variable and says what to do, exit status 2 and no traceback,
and every file that existed before is byte for byte the same afterwards (the prepared copy is the
user's to delete, never this project's). On copies of the synthetic tfds data (tests/conftest.py's
`synthetic_tfds`), damaged here and only here."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from common.mnist import UNVERIFIED_TEST_DIR_ENV
from common.sources import TFDS_DATA_DIR_ENV
from tests.frameworks import JAX, TORCH

FRAMEWORKS = pytest.mark.parametrize("framework", [TORCH, JAX], ids=["torch", "jax"])


def first_record(tfrecords: bytes) -> bytes:
    """A TFRecord file's first record, whole: its length (8 bytes, little-endian) and the length's
    CRC (4), the data, the data's CRC (4). Cut there, a shard reads without error, yet holds fewer
    examples than dataset_info.json counts."""
    return tfrecords[:8 + 4 + int.from_bytes(tfrecords[:8], "little") + 4]


# Each damage to a shard, and the TensorFlow error it ends in (named in the message's cause).
SHARD_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "cut within a record": (lambda shard: shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2]),
                            "DataLossError"),
    "cut after its first record": (lambda shard: shard.write_bytes(first_record(shard.read_bytes())),
                                   "FailedPreconditionError"),
    "missing": (Path.unlink, "NotFoundError"),
}
INFO_DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda text: text[:len(text) // 2],
    "not text": lambda text: b"\xff\xfe" + text,
}


def snapshot(root: Path) -> dict[Path, tuple[bytes, int]]:
    """Every file under `root`, with its bytes and modification time."""
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(root.rglob("*")) if path.is_file()}


def refusal(framework, data_dir: Path, tmp_path: Path, capsys) -> str:
    """A dry run on tfds over `data_dir` (under `tmp_path`): refused with exit status 2, no traceback
    and nothing under `tmp_path` changed or added (no --out, no new preparation); its stderr."""
    before = snapshot(tmp_path)
    status = framework.main(["--dry-run", "--data-source", "tfds", "--data-dir", str(data_dir),
                             "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert snapshot(tmp_path) == before
    return err


@pytest.fixture
def prepared_copy(synthetic_tfds: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic tfds data directory (the IDX files and the prepared mnist/<version>)."""
    return shutil.copytree(synthetic_tfds, tmp_path / "data")


def version_folder(data_dir: Path) -> Path:
    (folder,) = data_dir.glob("mnist/*/")
    return folder


@pytest.mark.parametrize("damage", sorted(SHARD_DAMAGE))
@FRAMEWORKS
def test_damaged_tfds_shard_names_the_folder_to_delete_and_keeps_it(framework, damage, prepared_copy, tmp_path,
                                                                     capsys):
    folder = version_folder(prepared_copy)
    damage_shard, tensorflow_error = SHARD_DAMAGE[damage]
    damage_shard(folder / "mnist-train.tfrecord-00000-of-00001")
    err = refusal(framework, prepared_copy, tmp_path, capsys)
    assert f"error: tfds's prepared MNIST in {folder} cannot be read ({tensorflow_error}: " in err
    assert f"delete {folder} to have it prepared again" in err and "--data-source idx" in err


@pytest.mark.parametrize("damage", sorted(INFO_DAMAGE))
@FRAMEWORKS
def test_corrupt_tfds_dataset_info_names_the_folder_to_delete_and_keeps_it(framework, damage, prepared_copy,
                                                                           tmp_path, capsys):
    folder = version_folder(prepared_copy)
    info = folder / "dataset_info.json"
    info.write_bytes(INFO_DAMAGE[damage](info.read_bytes()))
    err = refusal(framework, prepared_copy, tmp_path, capsys)
    assert f"error: tfds's prepared MNIST in {folder} cannot be read (its dataset_info.json: " in err
    assert f"delete {folder} to have it prepared again" in err and "--data-source idx" in err


@FRAMEWORKS
def test_tfds_data_dir_variable_naming_a_file_is_refused(framework, prepared_copy, tmp_path, monkeypatch, capsys):
    """--data-dir is no tfds data directory (its prepared mnist/ removed), so tfds would prepare
    MNIST in $TFDS_DATA_DIR, here a file."""
    shutil.rmtree(prepared_copy / "mnist")
    monkeypatch.setenv(UNVERIFIED_TEST_DIR_ENV, str(prepared_copy))  # the copy's IDX files, as the fixture's
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory")
    monkeypatch.setenv(TFDS_DATA_DIR_ENV, str(a_file))
    err = refusal(framework, prepared_copy, tmp_path, capsys)
    assert f"error: ${TFDS_DATA_DIR_ENV} is {a_file}, which is a file, not a directory" in err
    assert f"Point {TFDS_DATA_DIR_ENV} at a directory" in err and "--data-source idx" in err
