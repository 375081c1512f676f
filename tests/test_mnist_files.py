"""The MNIST reader: structure checks, checksums, layouts, downloads and the offline error."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import threading

import numpy as np
import pytest

from common import mnist
from common.download import DownloadFailed, download_verified
from common.errors import DataError
from common.idx import parse_idx
from common.mnist import MNIST_FILES, TEST_LABELS, find_file, load_mnist, read_mnist_file
from tests.idx_files import encode_idx, write_idx

LABELS = np.arange(10000, dtype=np.uint8) % 10  # right shape, wrong content


def test_parse_rejects_bad_magic():
    payload = encode_idx(LABELS, magic=0x00000803)
    with pytest.raises(DataError, match=r"magic number is 0x00000803, expected 0x00000801"):
        parse_idx(payload, (10000,), "labels-file")


def test_parse_rejects_truncated_payload():
    payload = encode_idx(LABELS)[:-10]
    with pytest.raises(DataError, match=r"labels-file: 9998 bytes, expected 10008 .*truncated"):
        parse_idx(payload, (10000,), "labels-file")


def test_parse_rejects_truncated_header():
    with pytest.raises(DataError, match=r"shorter than the 8-byte IDX header"):
        parse_idx(b"\x00\x00\x08", (10000,), "labels-file")


def test_parse_rejects_wrong_count():
    with pytest.raises(DataError, match=r"dimensions \(9999,\), expected \(10000,\)"):
        parse_idx(encode_idx(LABELS[:9999]), (10000,), "labels-file")


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(encode_idx(LABELS))[:-20])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: not a complete gzip file"):
        read_mnist_file(path, TEST_LABELS)


@pytest.mark.parametrize("name", ["t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.gz"])
def test_checksum_mismatch_names_file_expected_and_actual(tmp_path, name):
    path = write_idx(tmp_path / name, LABELS)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = TEST_LABELS.gz_sha256 if name.endswith(".gz") else TEST_LABELS.raw_sha256
    with pytest.raises(DataError) as error:
        read_mnist_file(path, TEST_LABELS)
    message = str(error.value)
    assert str(path) in message and actual in message and expected in message


def test_find_file_accepts_plain_gzip_and_torchvision_layouts(tmp_path):
    assert find_file(tmp_path, TEST_LABELS) is None
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    (raw_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    assert find_file(tmp_path, TEST_LABELS) == raw_dir / "t10k-labels-idx1-ubyte.gz"
    (raw_dir / "t10k-labels-idx1-ubyte").write_bytes(b"")
    assert find_file(tmp_path, TEST_LABELS) == raw_dir / "t10k-labels-idx1-ubyte"
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    assert find_file(tmp_path, TEST_LABELS) == tmp_path / "t10k-labels-idx1-ubyte.gz"


def test_offline_without_data_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "MIRRORS", ("http://127.0.0.1:9/",))  # the discard port: refused
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path / "empty")
    message = str(error.value)
    assert "--data-dir" in message and "MNIST_DATA_DIR" in message and "offline" in message
    assert not any((tmp_path / "empty").glob("*ubyte*"))


def test_corrupt_file_is_reported_and_left_untouched(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "MIRRORS", ("http://127.0.0.1:9/",))
    bad = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((60000, 28, 28), np.uint8))
    before = bad.read_bytes()
    with pytest.raises(DataError, match="SHA-256"):
        load_mnist(tmp_path)
    assert bad.read_bytes() == before


@pytest.fixture
def file_server(tmp_path):
    """An HTTP server on localhost serving `tmp_path / "served"`; yields its base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_verifies_then_renames(file_server, tmp_path):
    served, url = file_server
    payload = b"some bytes" * 1000
    (served / "good.gz").write_bytes(payload)
    destination = tmp_path / "data" / "good.gz"
    download_verified([url + "missing.gz", url + "good.gz"], destination, hashlib.sha256(payload).hexdigest())
    assert destination.read_bytes() == payload
    assert sorted(p.name for p in destination.parent.iterdir()) == ["good.gz"]  # no partial left


def test_download_with_wrong_checksum_never_replaces_the_destination(file_server, tmp_path):
    served, url = file_server
    (served / "bad.gz").write_bytes(b"tampered")
    destination = tmp_path / "data" / "bad.gz"
    destination.parent.mkdir()
    destination.write_bytes(b"previous content")
    with pytest.raises(DownloadFailed, match="SHA-256") as failure:
        download_verified([url + "bad.gz"], destination, "0" * 64)
    assert not failure.value.offline
    assert destination.read_bytes() == b"previous content"
    assert sorted(p.name for p in destination.parent.iterdir()) == ["bad.gz"]


@pytest.fixture
def synthetic_file_table(synthetic_dir, monkeypatch) -> dict[str, bytes]:
    """Make the synthetic files the "official" ones: the reader's file table gets their shapes
    and checksums, so that downloading and verifying can be tested on them. Returns the gzipped
    bytes of each file by name."""
    table, payloads = [], {}
    for spec in MNIST_FILES:
        gz_bytes = (synthetic_dir / f"{spec.name}.gz").read_bytes()
        raw = gzip.decompress(gz_bytes)
        shape = parse_idx(raw, (None, *spec.shape[1:]), spec.name).shape
        table.append(mnist.MnistFile(spec.name, shape, hashlib.sha256(gz_bytes).hexdigest(),
                                     hashlib.sha256(raw).hexdigest()))
        payloads[spec.name] = gz_bytes
    monkeypatch.setattr(mnist, "MNIST_FILES", tuple(table))
    return payloads


def test_load_mnist_downloads_missing_files(file_server, tmp_path, monkeypatch, synthetic_file_table,
                                            synthetic_mnist):
    served, url = file_server
    for name, payload in synthetic_file_table.items():
        (served / f"{name}.gz").write_bytes(payload)
    monkeypatch.setattr(mnist, "MIRRORS", (url,))
    data = load_mnist(tmp_path / "fresh")
    for ours, reference in zip(data, synthetic_mnist, strict=True):
        np.testing.assert_array_equal(ours, reference)
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == sorted(f"{s.name}.gz" for s in MNIST_FILES)


def test_uncompressed_torchvision_layout_reads_the_same(tmp_path, synthetic_file_table, synthetic_mnist):
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name, payload in synthetic_file_table.items():
        (raw_dir / name).write_bytes(gzip.decompress(payload))
    data = load_mnist(tmp_path, download=False)
    for ours, reference in zip(data, synthetic_mnist, strict=True):
        np.testing.assert_array_equal(ours, reference)


def test_only_the_synthetic_directory_skips_verification(synthetic_dir, tmp_path, monkeypatch):
    """The test-only switch names one directory: a copy of the same files anywhere else is
    checked against the official checksums and refused, and nothing is downloaded into the
    synthetic directory."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in synthetic_dir.glob("*.gz"):  # the four IDX files (the directory may also hold tfds's copy)
        (copy / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="IDX header gives dimensions"):
        load_mnist(copy, download=False)
    monkeypatch.setenv(mnist.UNVERIFIED_TEST_DIR_ENV, str(copy))
    assert len(load_mnist(copy, download=False).train_labels) == 640
    (copy / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setattr(mnist, "MIRRORS", ("http://127.0.0.1:9/",))
    with pytest.raises(DataError, match="downloading is disabled"):
        load_mnist(copy)


def test_real_files_read_and_verify(real_mnist):
    assert real_mnist.train_images.shape == (60000, 28, 28) and real_mnist.train_images.dtype == np.uint8
    assert real_mnist.test_images.shape == (10000, 28, 28)
    assert real_mnist.train_labels.shape == (60000,) and real_mnist.test_labels.shape == (10000,)
    # Known facts of the official files: label counts, and the mean pixel behind Normalize(0.1307, ...).
    assert np.bincount(real_mnist.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                                                            5949]
    assert real_mnist.train_images.mean() / 255 == pytest.approx(0.1306604762738429, abs=1e-12)


def test_real_files_have_the_official_checksums(real_mnist_dir):
    """The file table's SHA-256 values, against the files themselves, in whichever accepted
    layout and compression the directory holds them."""
    for spec in MNIST_FILES:
        path = find_file(real_mnist_dir, spec)
        assert path is not None, f"{spec.name} is not in {real_mnist_dir}"
        expected = spec.gz_sha256 if path.suffix == ".gz" else spec.raw_sha256
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected, path


def test_missing_file_without_download_names_the_flags(tmp_path):
    with pytest.raises(DataError, match=r"--data-dir DIR or set MNIST_DATA_DIR=DIR"):
        load_mnist(tmp_path, download=False)


def test_data_dir_flag_beats_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path / "from-env"))
    assert mnist.resolve_data_dir(None) == tmp_path / "from-env"
    assert mnist.resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv("MNIST_DATA_DIR")
    assert mnist.resolve_data_dir(None) == mnist.DEFAULT_DATA_DIR


def test_parse_returns_exact_values():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(encode_idx(images), (3, 28, 28), "x"), images)
