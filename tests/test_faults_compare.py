"""benchmarks/compare.py's bad input and bad luck: missing data, bad flags and an --out that holds
anything are refused before anything is measured; a run that fails or is interrupted before its
first figure removes what it wrote, never what was there before, and one stopped later keeps the
figures measured so far, marked incomplete.
On the synthetic MNIST (tests/synthetic_mnist.py); the refusals and the failures in-process,
Ctrl-C in a real process."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import pytest

from common import mnist
from common.errors import UserFacingError
from tests.conftest import REPO_ROOT

COMPARE = ["benchmarks/compare.py", "--quick"]


@pytest.fixture(scope="module")
def compare_module():
    spec = importlib.util.spec_from_file_location("compare", REPO_ROOT / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    yield module
    del sys.modules["compare"]


@pytest.mark.parametrize("case", ["missing data", "unknown recipe", "batch size 0", "batch larger than data"])
def test_compare_reports_bad_input_and_creates_nothing(case, compare_module, synthetic_dir, tmp_path, monkeypatch,
                                                      capsys):
    monkeypatch.setattr(mnist, "MIRRORS", ("http://127.0.0.1:9/",))  # refused at once: offline
    out = tmp_path / "results"
    args = {"missing data": ["--data-dir", str(tmp_path / "empty")],
            "unknown recipe": ["--data-dir", str(synthetic_dir), "--recipe", "nope"],
            "batch size 0": ["--data-dir", str(synthetic_dir), "--batch-sizes", "0"],
            "batch larger than data": ["--data-dir", str(synthetic_dir), "--batch-sizes", "128,100000"]}[case]
    expected = {"missing data": "could not be downloaded", "unknown recipe": "choose one of",
                "batch size 0": "expected a positive integer", "batch larger than data": "is larger than the 640"}[case]
    try:
        status = compare_module.main([*args, "--quick", "--out", str(out)])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and expected in err and "Traceback" not in err
    assert not out.exists()


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder (None) under `root`."""
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def test_compare_refuses_an_out_that_holds_anything_before_measuring(compare_module, synthetic_dir, tmp_path,
                                                                     monkeypatch, capsys):
    out = tmp_path / "results"
    (out / "torch_ref").mkdir(parents=True)
    (out / "results.json").write_text('{"an": "earlier run"}\n')
    before = tree(tmp_path)
    monkeypatch.setattr(compare_module, "sgemm_gflops", lambda: pytest.fail("measured before refusing --out"))
    status = compare_module.main(["--data-dir", str(synthetic_dir), "--quick", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.count("\n") == 1
    assert err.startswith(f"error: --out {out} is not empty; choose another --out, or empty it")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["under a file", "a name too long"])
def test_compare_names_an_out_it_cannot_write_before_measuring(case, compare_module, synthetic_dir, tmp_path,
                                                               monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("the user's notes\n")
    out, cause = {"under a file": (tmp_path / "notes.txt" / "results", "notes.txt is a file"),
                  "a name too long": (tmp_path / ("x" * 300), "File name too long")}[case]
    monkeypatch.setattr(compare_module, "sgemm_gflops", lambda: pytest.fail("measured before refusing --out"))
    status = compare_module.main(["--data-dir", str(synthetic_dir), "--quick", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and cause in err and "Traceback" not in err, err
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


FAILURES = {"new directory": ("results", RuntimeError), "new parents": ("made/for/results", RuntimeError),
            "empty directory": ("results", RuntimeError), "a user's error": ("results", UserFacingError)}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failed_compare_removes_what_it_wrote(case, compare_module, synthetic_dir, tmp_path, monkeypatch, capsys):
    name, error = FAILURES[case]
    out = tmp_path / name
    if case == "empty directory":
        out.mkdir()  # accepted, and kept: only what the run wrote into it goes
    (tmp_path / "neighbour.txt").write_text("not the run's\n")
    before = tree(tmp_path)

    def measurement_that_fails() -> NoReturn:
        # As --train's runs do, minutes before the report: write into --out, then fail.
        (out / "torch_ref").mkdir()
        (out / "torch_ref" / "metrics.jsonl").write_text("{}\n")
        raise error("the measurement failed")

    monkeypatch.setattr(compare_module, "sgemm_gflops", measurement_that_fails)
    argv = ["--data-dir", str(synthetic_dir), "--quick", "--out", str(out)]
    if error is UserFacingError:
        assert compare_module.main(argv) == 2
        assert capsys.readouterr().err == "error: the measurement failed\n"
    else:
        with pytest.raises(RuntimeError, match="the measurement failed"):  # a bug keeps its traceback
            compare_module.main(argv)
    assert tree(tmp_path) == before


def test_a_compare_stopped_after_its_results_json_keeps_the_report(compare_module, tmp_path):
    # The complete results.json is written last, after the plots: only the printing of the tables is left.
    out = tmp_path / "made" / "results"
    out.mkdir(parents=True)
    (out / "throughput.png").write_bytes(b"png")
    (out / "results.json").write_text('{"complete": true}\n')
    before = tree(tmp_path)
    assert compare_module.settle(out, tmp_path / "made") == f"the results in {out} are complete and kept"
    assert tree(tmp_path) == before


def test_a_compare_stopped_half_way_keeps_what_it_measured(compare_module, tmp_path):
    # results.json is rewritten after each round, marked incomplete: minutes of measuring are not thrown away.
    out = tmp_path / "made" / "results"
    (out / "torch_ref").mkdir(parents=True)
    (out / "results.json").write_text('{"complete": false, "throughput": {"128": {}}}\n')
    before = tree(tmp_path)
    assert compare_module.settle(out, tmp_path / "made") == (
        f"the figures measured so far are kept in {out / 'results.json'} (marked incomplete)")
    assert tree(tmp_path) == before


def test_ctrl_c_while_measuring_ends_quietly_and_removes_what_the_run_made(synthetic_dir, tmp_path):
    out = tmp_path / "made" / "results"
    with (tmp_path / "stderr.txt").open("w") as stderr:
        process = subprocess.Popen([sys.executable, *COMPARE, "--data-dir", str(synthetic_dir), "--out", str(out)],
                                   cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            # --out appears just before the first measurement, seconds before the first results.json.
            deadline = time.monotonic() + 300
            while not out.is_dir() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            process.send_signal(signal.SIGINT)
            status = process.wait(timeout=120)
        finally:
            process.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert status == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.splitlines()[-1] == f"interrupted: nothing was kept ({out} is as it was before the run)."
    assert sorted(path.name for path in tmp_path.iterdir()) == ["stderr.txt"]


INTERRUPT_IN_A_GC_CALLBACK = """
import gc, runpy, sys
from pathlib import Path

out, pending = Path(sys.argv[-1]), [True]

def interrupt(phase, info):
    if pending and out.is_dir():
        pending.clear()
        raise KeyboardInterrupt

gc.callbacks.append(interrupt)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_that_lands_in_a_garbage_collector_callback_is_not_lost(synthetic_dir, tmp_path):
    # Python swallows (with a traceback) an exception raised in a gc callback, and JAX runs one at
    # every collection: seen in about one Ctrl-C in ten here. This raises it in one, once measuring began.
    out = tmp_path / "made" / "results"
    result = subprocess.run([sys.executable, "-c", INTERRUPT_IN_A_GC_CALLBACK, *COMPARE, "--data-dir",
                             str(synthetic_dir), "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == f"interrupted: nothing was kept ({out} is as it was before the run)."
    assert not (tmp_path / "made").exists()


def test_ctrl_c_while_torch_and_jax_import_ends_quietly(synthetic_dir, tmp_path):
    out = tmp_path / "results"
    # -X importtime: a line on stderr as each module's import ends; the first of JAX's means that the
    # imports of the frameworks (seconds) have begun, after compare.py's first lines.
    process = subprocess.Popen([sys.executable, "-X", "importtime", *COMPARE, "--data-dir", str(synthetic_dir),
                                "--out", str(out)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        imported = []
        for line in process.stderr:
            imported.append(line.rsplit("|", 1)[-1].strip())
            if imported[-1].startswith("jax"):
                process.send_signal(signal.SIGINT)
                break
        err = process.communicate(timeout=120)[1]
    finally:
        process.kill()
    assert imported[-1].startswith("jax"), imported[-20:]
    assert process.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "\ninterrupted: nothing was written.\n" in err
    assert not out.exists()
