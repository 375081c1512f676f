"""Bad input and bad luck, as a careful user would try them: every case ends with exit code 2 and
a message that says what to do, and every file that existed before is byte for byte the same
afterwards. On the synthetic MNIST (tests/synthetic_mnist.py), for both trainers where both are
concerned, and a SIGKILL in the middle of an epoch for each."""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from common import download, mnist
from common.checkpoints import sealed_meta
from tests.conftest import REPO_ROOT
from tests.frameworks import JAX, TORCH

FRAMEWORKS = pytest.mark.parametrize("framework", [TORCH, JAX], ids=["torch", "jax"])


def snapshot(*roots: Path) -> dict[Path, bytes]:
    """Every file under `roots`, with its bytes."""
    return {path: path.read_bytes() for root in roots for path in sorted(Path(root).rglob("*")) if path.is_file()}


def run(framework, args: list[str], capsys) -> tuple[int, str]:
    status = framework.main(args)
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, synthetic_dir) -> dict[str, Path]:
    """A finished dry run of each framework (two short epochs), with its --save-model file."""
    runs = {}
    for framework in (TORCH, JAX):
        out = tmp_path_factory.mktemp("runs") / framework.name
        assert framework.main(["--dry-run", "--save-model", "--out", str(out), "--data-dir", str(synthetic_dir)]) == 0
        runs[framework.name] = out
    return runs


# Data directory and --out


def test_data_dir_that_cannot_be_created_names_it(synthetic_dir, tmp_path, monkeypatch, capsys):
    target = tmp_path / "read-only" / "mnist"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == target or target in self.parents or self == target.parent:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    status, err = run(TORCH, ["--dry-run", "--data-dir", str(target), "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and "cannot be written (Read-only file system)" in err and "--data-dir" in err
    assert "Traceback" not in err


def test_read_only_data_dir_lacking_a_file_says_so_and_stays_as_it_is(tmp_path, monkeypatch, capsys):
    data_dir = tmp_path / "partial"
    data_dir.mkdir()
    (data_dir / "unrelated.txt").write_text("the user's file")
    before = snapshot(data_dir)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(mnist.tempfile, "TemporaryFile", read_only)
    status, err = run(JAX, ["--dry-run", "--data-dir", str(data_dir), "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and "cannot be downloaded there" in err and "Read-only file system" in err
    assert snapshot(data_dir) == before


@FRAMEWORKS
def test_out_or_data_dir_that_is_a_file_is_refused(framework, synthetic_dir, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory")
    status, err = run(framework, ["--dry-run", "--data-dir", str(synthetic_dir), "--out", str(a_file)], capsys)
    assert status == 2 and f"--out {a_file} is a file" in err
    status, err = run(framework, ["--dry-run", "--data-dir", str(a_file), "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and f"{a_file} is a file" in err
    assert a_file.read_text() == "not a directory" and not (tmp_path / "run").exists()


UNUSED_FLAGS = {
    "empty --out": (["--out", ""], "--out is empty"),
    "--ema-decay without EMA": (["--ema-decay", "0.99"], "--ema-decay applies to --average ema"),
    "--swa-start with EMA": (["--average", "ema", "--swa-start", "3"], "--swa-start applies to --average swa"),
    "SWA from after the last epoch": (["--average", "swa", "--swa-start", "16"], "nothing would be averaged"),
    "the default shortened before its SWA": (["--epochs", "3"], "a recipe that does not average (--recipe best)"),
}


@pytest.mark.parametrize("case", sorted(UNUSED_FLAGS))
@FRAMEWORKS
def test_a_flag_that_would_change_nothing_is_refused(framework, case, synthetic_dir, tmp_path, monkeypatch, capsys):
    """An empty --out (which would mean the default), or a flag of the other kind of averaging:
    refused before anything is written, rather than ignored."""
    monkeypatch.chdir(tmp_path)  # the default --out is relative: nothing may appear here
    flags, expected = UNUSED_FLAGS[case]
    status, err = run(framework, ["--dry-run", "--data-dir", str(synthetic_dir), *flags], capsys)
    assert status == 2 and expected in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_batch_larger_than_the_training_set_is_refused(synthetic_dir, tmp_path, capsys):
    status, err = run(JAX, ["--dry-run", "--batch-size", "100000", "--data-dir", str(synthetic_dir),
                            "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and "--batch-size 100000 is larger than the 640 training images" in err


def _more_devices_than_allowed() -> int:
    """A power of two above the limit of devices per process (so that it divides a batch of itself)."""
    from common.processes import FEW_CPU_DEVICES
    from common.system import usable_cpu_count

    return 1 << max(FEW_CPU_DEVICES, usable_cpu_count()).bit_length()


@pytest.mark.parametrize("case", ["beyond the cores", "not dividing the batch"])
@FRAMEWORKS
def test_a_device_count_is_checked_before_anything_starts(framework, case, synthetic_dir, tmp_path, capsys):
    """Refused once, before any process or device starts: PyTorch used to launch the processes
    (with an absurd count, memory climbed without a word; with 3, each printed the error), JAX
    to stop with a traceback from its backend."""
    count = _more_devices_than_allowed() if case == "beyond the cores" else 3
    batch = count if case == "beyond the cores" else 128
    out = tmp_path / "run"
    status, err = run(framework, ["--dry-run", "--devices", str(count), "--batch-size", str(batch),
                                  "--data-dir", str(synthetic_dir), "--out", str(out)], capsys)
    expected = f"--devices {count}: at most" if case == "beyond the cores" else "cannot be cut into 3 equal parts"
    assert status == 2 and err.count(expected) == 1 and "Traceback" not in err, err
    assert not out.exists()


def _cannot_create_files(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


OUTPUT_PATHS = {  # what --out is, and the cause the message must name
    "under a file": (lambda root: root / "notes.txt" / "run", "notes.txt is a file"),
    "a name too long": (lambda root: root / ("x" * 300), "File name too long"),
    "not writable": (lambda root: root / "locked", "Permission denied"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_PATHS))
@FRAMEWORKS
def test_an_output_directory_that_cannot_be_written_is_named_before_training(framework, case, synthetic_dir, tmp_path,
                                                                             monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("the user's notes")
    (tmp_path / "locked").mkdir()
    if case == "not writable":  # the tests run as root, whom no permission stops: the system's refusal, simulated
        monkeypatch.setattr("common.files.tempfile.mkstemp", _cannot_create_files)
    out, cause = OUTPUT_PATHS[case]
    before = snapshot(tmp_path)
    status, err = run(framework, ["--dry-run", "--data-dir", str(synthetic_dir), "--out", str(out(tmp_path))], capsys)
    assert status == 2 and cause in err and "choose a directory that can be written" in err, err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["locked", "notes.txt"]


@pytest.mark.parametrize("case", ["under a file", "a name too long"])
def test_convert_names_a_destination_it_cannot_write(case, finished_runs, tmp_path, capsys):
    from bridge import convert

    (tmp_path / "notes.txt").write_text("the user's notes")
    destination = OUTPUT_PATHS[case][0](tmp_path).with_suffix(".msgpack")
    status = convert.main([str(finished_runs["torch"] / TORCH.checkpoint_name), str(destination)])
    err = capsys.readouterr().err
    assert status == 2 and OUTPUT_PATHS[case][1] in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_write_the_system_refuses_keeps_the_previous_checkpoint(synthetic_dir, tmp_path, monkeypatch, capsys):
    """A full disk or a file-size limit (EFBIG) while the second epoch's checkpoint is written:
    one line naming the file, and the first epoch's checkpoint as it was, with no temporary
    file left behind."""
    from common import files

    out, real_open, real_fsync, opened, checkpoints = tmp_path / "run", os.open, os.fsync, {}, []

    def open_and_remember(path, *args, **kwargs) -> int:
        descriptor = real_open(path, *args, **kwargs)
        opened[descriptor] = str(path)
        return descriptor

    def fsync(descriptor: int) -> None:
        if TORCH.checkpoint_name in opened.get(descriptor, ""):
            checkpoints.append(descriptor)
            if len(checkpoints) == 2:
                raise OSError(errno.EFBIG, "File too large")
        real_fsync(descriptor)

    monkeypatch.setattr(files.os, "open", open_and_remember)
    monkeypatch.setattr(files.os, "fsync", fsync)
    status, err = run(TORCH, ["--dry-run", "--data-dir", str(synthetic_dir), "--out", str(out)], capsys)
    assert status == 2 and f"cannot write {out / TORCH.checkpoint_name} (File too large)" in err, err
    assert "Traceback" not in err and len(checkpoints) == 2
    meta, _ = TORCH.read_checkpoint(out / TORCH.checkpoint_name)
    assert meta["epoch"] == 1 and not list(out.glob(".*.tmp"))


# Other runs are never overwritten


@FRAMEWORKS
def test_a_directory_another_run_is_writing_is_refused(framework, synthetic_dir, tmp_path, capsys):
    """Two runs started at once on one --out: the first claims the directory (here, the test
    holds the claim), the second is refused whatever it finds there."""
    from common.claims import DirectoryClaim

    out = tmp_path / "run"
    claim = DirectoryClaim(out)
    try:
        status, err = run(framework, ["--dry-run", "--data-dir", str(synthetic_dir), "--out", str(out)], capsys)
    finally:
        claim.release()
    assert status == 2 and "is being written by another run right now" in err and "Traceback" not in err, err
    assert [path.name for path in out.iterdir()] == [".run.lock"]



@FRAMEWORKS
def test_out_holding_the_other_frameworks_run_is_refused(framework, finished_runs, synthetic_dir, capsys):
    other = finished_runs["jax" if framework is TORCH else "torch"]
    before = snapshot(other)
    status, err = run(framework, ["--dry-run", "--data-dir", str(synthetic_dir), "--out", str(other)], capsys)
    assert status == 2 and "already holds a run" in err and "--resume" in err
    assert snapshot(other) == before


@FRAMEWORKS
def test_resume_refuses_to_change_dry_run(framework, finished_runs, synthetic_dir, tmp_path, capsys):
    dry = finished_runs[framework.name]
    before = snapshot(dry)
    status, err = run(framework, ["--resume", str(dry), "--data-dir", str(synthetic_dir)], capsys)
    assert status == 2 and "the checkpoint is from a dry run" in err
    assert snapshot(dry) == before
    full = tmp_path / "full"
    assert framework.main(["--recipe", "best", "--epochs", "1", "--batch-size", "128", "--data-dir",
                           str(synthetic_dir), "--out", str(full)]) == 0
    capsys.readouterr()
    before = snapshot(full)
    status, err = run(framework, ["--resume", str(full), "--dry-run", "--data-dir", str(synthetic_dir)], capsys)
    assert status == 2 and "the checkpoint is from a full run" in err
    assert snapshot(full) == before


@FRAMEWORKS
def test_resume_rewrites_metrics_lost_between_the_two_writes(framework, finished_runs, synthetic_dir, tmp_path):
    """A kill after the checkpoint of epoch 2 but before its metrics line: the resumed run's
    metrics.jsonl is the checkpoint's own history again."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for path in finished_runs[framework.name].iterdir():
        (run_dir / path.name).write_bytes(path.read_bytes())
    complete = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(complete.splitlines(keepends=True)[0])
    assert framework.main(["--resume", str(run_dir), "--dry-run", "--data-dir", str(synthetic_dir)]) == 0
    assert (run_dir / "metrics.jsonl").read_text() == complete


@FRAMEWORKS
def test_resume_keeps_the_model_file_and_the_device_count(framework, finished_runs, synthetic_dir, tmp_path, capsys):
    """A resumed run ends with its --save-model file as the run started would; its checkpoint
    records the devices it trained on, and PyTorch, whose CPU processes normalise with their own
    BatchNorm statistics, refuses to go on with another number."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for path in finished_runs[framework.name].iterdir():
        if path.name != framework.model_name:
            (run_dir / path.name).write_bytes(path.read_bytes())
    meta, _ = framework.read_checkpoint(run_dir / framework.checkpoint_name)
    assert meta["devices"] == 1 and meta["settings"]["save_model"]
    if framework is TORCH:
        before = snapshot(run_dir)
        status, err = run(framework, ["--resume", str(run_dir), "--dry-run", "--devices", "2",
                                      "--data-dir", str(synthetic_dir)], capsys)
        assert status == 2 and "the checkpoint was trained on 1 device(s)" in err and "Traceback" not in err, err
        assert snapshot(run_dir) == before
    assert framework.main(["--resume", str(run_dir), "--dry-run", "--data-dir", str(synthetic_dir)]) == 0
    assert (run_dir / framework.model_name).is_file()


@pytest.mark.parametrize("batch", ["641", "8193"])
@FRAMEWORKS
def test_evaluate_bounds_the_recalibration_batch(framework, batch, finished_runs,
                                                                        synthetic_dir, capsys):
    """A batch is bounded by the training images and by memory (8,192 images, about 1 GB); a
    larger number used to be taken silently (the whole training set at once: 6-7 GB)."""
    weights = finished_runs[framework.name] / framework.model_name
    status = framework.evaluate_main([str(weights), "--data-dir", str(synthetic_dir), "--recalibrate-bn", batch])
    err = capsys.readouterr().err
    expected = {"641": "--recalibrate-bn 641: a batch holds at most the 640 training images",
                "8193": "--recalibrate-bn 8193: a train-mode pass keeps every layer's activations"}[batch]
    assert status == 2 and expected in err and "Traceback" not in err, err


# Checkpoints: wrong contents, damaged bytes


def _resealed_torch_checkpoint(source: Path, destination: Path, change) -> None:
    import torch

    from torch_ref.checkpoints import tensor_to_array

    payload = torch.load(source, weights_only=True)
    meta = json.loads(payload.pop("meta"))
    change(payload)
    torch.save({"meta": sealed_meta(meta, payload, tensor_to_array), **payload}, destination)


def _resealed_jax_checkpoint(source: Path, destination: Path, change) -> None:
    from flax import serialization

    payload = serialization.msgpack_restore(source.read_bytes())
    meta = json.loads(payload.pop("meta"))
    change(payload["state"]["params"])
    destination.write_bytes(serialization.msgpack_serialize({"meta": sealed_meta(meta, payload), **payload}))


@pytest.mark.parametrize("mistake", ["shape", "missing"])
@FRAMEWORKS
def test_checkpoint_that_does_not_fit_the_model_names_the_key(framework, mistake, finished_runs, synthetic_dir,
                                                              tmp_path, capsys):
    """A well-formed checkpoint of another model (a tensor of another shape, or one missing):
    the error names the tensor, and the file is left as it is."""
    source = finished_runs[framework.name] / framework.checkpoint_name
    broken = tmp_path / framework.checkpoint_name
    if framework is TORCH:
        def change(payload):
            if mistake == "shape":
                payload["model"]["conv6.weight"] = payload["model"]["conv6.weight"][:5]
            else:
                del payload["model"]["conv6.weight"]
        _resealed_torch_checkpoint(source, broken, change)
    else:
        def change(params):
            if mistake == "shape":
                params["conv6"]["kernel"] = params["conv6"]["kernel"][..., :5]
            else:
                del params["conv6"]
        _resealed_jax_checkpoint(source, broken, change)
    before = snapshot(tmp_path)
    status, err = run(framework, ["--resume", str(broken), "--dry-run", "--data-dir", str(synthetic_dir)], capsys)
    assert status == 2 and "conv6" in err and "does not fit" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


@FRAMEWORKS
def test_a_flipped_byte_in_a_checkpoint_is_detected(framework, finished_runs, synthetic_dir, tmp_path, capsys):
    """One bit of a stored weight flipped (as a bad disk or copy would): the loader reads the
    file happily, the digest recorded at saving does not match, and nothing is trained or
    evaluated."""
    source = finished_runs[framework.name] / framework.checkpoint_name
    data = bytearray(source.read_bytes())
    if framework is TORCH:
        import torch

        weight = torch.load(source, weights_only=True)["model"]["conv4.weight"].numpy()
    else:
        from flax import serialization

        weight = serialization.msgpack_restore(bytes(data))["state"]["params"]["conv4"]["kernel"]
    start = bytes(data).find(np.ascontiguousarray(weight).tobytes())
    assert start > 0
    data[start + 41] ^= 0x40  # an exponent bit of one float32
    broken = tmp_path / framework.checkpoint_name
    broken.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    status, err = run(framework, ["--resume", str(broken), "--dry-run", "--data-dir", str(synthetic_dir)], capsys)
    assert status == 2 and "do not match the SHA-256" in err
    assert framework.evaluate_main([str(broken), "--data-dir", str(synthetic_dir)]) == 2  # evaluating it neither
    assert "do not match the SHA-256" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


# Divergence


@pytest.mark.parametrize("lr", ["100", "1000"])
@FRAMEWORKS
def test_diverging_run_saves_nothing_non_finite(framework, lr, synthetic_dir, tmp_path, capsys):
    """The seed recipe (a constant lr) at --lr 100 and 1000, 2,500 and 25,000 times its rate: the
    weights of conv6, which no BatchNorm follows, grow until the loss overflows. Rounding moves
    the step at which that happens, not whether the dry run reaches it: PyTorch at 100 trains
    epoch 1 to a huge but finite test loss (saved) and is stopped after epoch 2, whose weights
    are no longer finite; the other three are stopped in or after epoch 1."""
    out = tmp_path / "run"
    status, err = run(framework, ["--dry-run", "--recipe", "seed", "--lr", lr, "--data-dir", str(synthetic_dir),
                                  "--out", str(out)], capsys)
    assert status == 2 and ("no longer finite" in err or "training loss became" in err)
    if (out / "metrics.jsonl").exists():  # strict JSON: NaN or Infinity would not parse
        for line in (out / "metrics.jsonl").read_text().splitlines():
            json.loads(line, parse_constant=lambda name: pytest.fail(f"metrics hold {name}"))
    if (out / framework.checkpoint_name).exists():
        weights = framework.weights.read(out / framework.checkpoint_name)
        leaves = weights.values() if framework is TORCH else _leaves(weights)
        assert all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


# Several processes: launcher environments, rendezvous, orphans


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "JAX_COORDINATOR_ADDRESS",
                    "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _launcher_environments(port: int) -> dict[tuple[str, str], tuple[dict, str]]:
    """(framework, case) -> (the environment a user or cluster left, what the error must say);
    nothing ever listens on `port`, and a join waits 1 s."""
    master = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "MNIST_JOIN_TIMEOUT": "1"}
    coordinator = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "MNIST_JOIN_TIMEOUT": "1"}
    return {
        ("torch", "$RANK alone"): ({"RANK": "1"}, "$RANK is set without $WORLD_SIZE"),
        ("torch", "$WORLD_SIZE alone"): ({"WORLD_SIZE": "2"}, "$WORLD_SIZE is set without $RANK"),
        ("torch", "no master"): ({"WORLD_SIZE": "2", "RANK": "1"}, "without $MASTER_ADDR and $MASTER_PORT"),
        ("torch", "rank out of range"): ({"WORLD_SIZE": "2", "RANK": "2", **master}, "numbered 0 to 1"),
        ("jax", "count alone"): ({"JAX_NUM_PROCESSES": "2"}, "set without $JAX_COORDINATOR_ADDRESS"),
        ("jax", "address not host:port"): ({"JAX_COORDINATOR_ADDRESS": "localhost"}, "is not host:port"),
        ("jax", "id out of range"): ({**coordinator, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
                                     "numbered 0 to 1"),
        # Past this point jax.distributed starts, which it does only before JAX's first computation,
        # or the process waits and is ended: these run as processes of their own.
        ("jax", "no count"): ({**coordinator, "JAX_PROCESS_ID": "1"}, "Number of processes must be defined"),
        ("jax", "no process id"): ({**coordinator, "JAX_NUM_PROCESSES": "2"}, "process id of the current process"),
        ("torch", "process 0 never comes"): ({"WORLD_SIZE": "2", "RANK": "1", **master},
                                             f"waited 1 s for process 0 at 127.0.0.1:{port}"),
        ("jax", "the coordinator never answers"): ({**coordinator, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
                                                   f"waited 1 s for process 0 at 127.0.0.1:{port}"),
    }


IN_PROCESS = 7  # the first cases above end before anything starts


@pytest.mark.slow
def test_launcher_environments_are_checked_and_their_waits_bounded(synthetic_dir, tmp_path, monkeypatch, capsys):
    """Half-set launcher variables, and a rendezvous whose other side never comes: one line
    that says what to set or what was awaited, exit 2, nothing written; PyTorch and JAX used to
    end in tracebacks, waits of 30 minutes, or an abort from XLA's runtime."""
    frameworks = {"torch": TORCH, "jax": JAX}
    environments = list(_launcher_environments(_free_port()).items())
    for index, ((framework, case), (variables, expected)) in enumerate(environments[:IN_PROCESS]):
        with monkeypatch.context() as patch:
            for name in LAUNCH_VARIABLES:
                patch.delenv(name, raising=False)
            for name, value in variables.items():
                patch.setenv(name, value)
            out = tmp_path / f"run{index}"
            status, err = run(frameworks[framework], ["--dry-run", "--data-dir", str(synthetic_dir),
                                                      "--out", str(out)], capsys)
        assert status == 2 and expected in err and "Traceback" not in err, (framework, case, err[-1500:])
        assert not out.exists(), (framework, case)

    clean = {name: value for name, value in os.environ.items() if name not in LAUNCH_VARIABLES}
    started = {}
    for index, ((framework, case), (variables, expected)) in enumerate(environments[IN_PROCESS:], start=IN_PROCESS):
        out = tmp_path / f"run{index}"
        started[framework, case] = out, expected, subprocess.Popen(
            [sys.executable, "-m", frameworks[framework].train_module.__name__, "--dry-run",
             "--data-dir", str(synthetic_dir), "--out", str(out)],
            env={**clean, **variables, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
    for (framework, case), (out, expected, process) in started.items():
        _, err = process.communicate(timeout=120)
        assert process.returncode == 2 and expected in err and "Traceback" not in err, (framework, case, err[-1500:])
        assert not out.exists(), (framework, case)


def _starting_processes(launcher: int) -> list[int]:
    """The processes `launcher` spawned (multiprocessing's spawn_main), from the moment they exist."""
    listed = subprocess.run(["pgrep", "-f", "-P", str(launcher), "spawn_main"], capture_output=True, text=True).stdout
    return [int(child) for child in listed.split()]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent may be slow to reap it)."""
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="Windows leaves no trace of a dead parent; see torch_ref.distributed")
def test_training_processes_end_with_their_launcher(synthetic_dir, tmp_path):
    """SIGKILL of `--devices 2`'s launcher while its processes start (before torch arms its own
    parent-death signal, which Linux alone has): they used to live on as orphans, waiting for a
    rendezvous that had died with the launcher. They must notice and end within seconds."""
    launcher = subprocess.Popen(_train_command(TORCH, tmp_path / "run", synthetic_dir, "--devices", "2"),
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(_starting_processes(launcher.pid)) < 2 and time.monotonic() < deadline:
        assert launcher.poll() is None, "the launcher ended before its processes started"
        time.sleep(0.02)
    children = _starting_processes(launcher.pid)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(timeout=60)
    try:
        deadline = time.monotonic() + 30
        while any(map(_running, children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(children) == 2 and not any(map(_running, children)), "orphans still running 30 s after the kill"
    finally:
        for child in children:
            if _running(child):
                os.kill(child, signal.SIGKILL)


# Ctrl-C


@pytest.fixture
def ctrl_c_delivered():
    """Python's own SIGINT handler for the test, whatever this process inherited: a shell starts a
    background job (`pytest ... &`) with SIGINT ignored, and then no Ctrl-C would arrive at all."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_swallowed_by_a_finaliser_still_stops_the_run(synthetic_dir, tmp_path, monkeypatch, capsys,
                                                             ctrl_c_delivered):
    """JAX runs many finalisers and garbage-collector callbacks; a Ctrl-C arriving in one used to
    be printed as "Exception ignored" with a traceback and lost, and the run went on. Here it
    arrives in a finaliser just after epoch 1's evaluation: the run stops with its one line."""
    import weakref

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # the trainer's hook, removed afterwards
    real_evaluate = JAX.train_module.evaluate_log_probs

    class Garbage:
        pass

    def evaluate_then_ctrl_c_in_a_finaliser(*args, **kwargs):
        evaluation = real_evaluate(*args, **kwargs)
        garbage = Garbage()
        weakref.finalize(garbage, signal.raise_signal, signal.SIGINT)
        del garbage  # the finaliser runs here, and the KeyboardInterrupt is raised inside it
        time.sleep(1.0)  # where the run would have gone on: the interrupt must arrive meanwhile
        return evaluation

    monkeypatch.setattr(JAX.train_module, "evaluate_log_probs", evaluate_then_ctrl_c_in_a_finaliser)
    out = tmp_path / "run"
    status, err = run(JAX, ["--dry-run", "--data-dir", str(synthetic_dir), "--out", str(out)], capsys)
    assert status == 130 and "interrupted:" in err, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert not (out / "metrics.jsonl").exists()  # stopped in epoch 1, before anything of it was written


# The network


@pytest.fixture
def silent_server():
    """A host that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def test_a_mirror_that_never_answers_costs_seconds_not_minutes(silent_server, tmp_path, monkeypatch, capsys):
    """The wait is bounded by download_verified's timeout: its default is seconds, and here a
    shorter one shows that the bound holds on the way load_mnist downloads."""
    default_timeout = inspect.signature(download.download_verified).parameters["timeout"].default
    assert 0 < default_timeout <= 30
    monkeypatch.setattr(mnist, "MIRRORS", (silent_server,))
    monkeypatch.setattr(mnist, "download_verified", functools.partial(download.download_verified, timeout=1.0))
    started = time.monotonic()
    with pytest.raises(mnist.DataError, match="could not be downloaded"):
        mnist.load_mnist(tmp_path / "data")
    assert time.monotonic() - started < 5  # one 1-second wait, plus the test's own start-up
    err = capsys.readouterr().err
    assert f"downloading {silent_server}" in err and "(waiting at most 1 s for an answer)" in err
    assert not any((tmp_path / "data").iterdir())


# SIGKILL in the middle of an epoch


def _train_command(framework, out: Path, synthetic_dir: Path, *extra: str) -> list[str]:
    """A short full run: of `best`, since the default averages from epoch 11."""
    return [sys.executable, "-m", framework.train_module.__name__, "--recipe", "best", "--epochs", "3",
            "--batch-size", "16", "--seed", "3", "--threads", "1", "--data-dir", str(synthetic_dir), *extra,
            "--out", str(out)]


@pytest.mark.slow
@FRAMEWORKS
def test_sigkill_during_epoch_2_then_resume_equals_the_uninterrupted_run(framework, synthetic_dir, tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_train_command(framework, reference, synthetic_dir), env=environment, cwd=REPO_ROOT,
                   check=True, capture_output=True, timeout=600)

    process = subprocess.Popen(_train_command(framework, killed, synthetic_dir), env=environment, cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    epochs_done = metrics.read_text().count("\n")
    assert epochs_done < 3, "the kill came after the last epoch"

    resumed = subprocess.run(_train_command(framework, killed, synthetic_dir, "--resume", str(killed)),
                             env=environment, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after epoch {epochs_done}" in resumed.stdout

    def numbers(path):
        return [(r["train_loss"], r["train_accuracy"], r["test_loss"], r["test_accuracy"], r["lr"])
                for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]

    assert numbers(killed) == numbers(reference)
