"""The ``python -m miniresnet.train`` command line: checks, help, Ctrl-C and --resume."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import miniresnet as mr
import miniresnet.train
from miniresnet import data
from miniresnet.checkpoint import load_checkpoint
from miniresnet.train import PROG, main

TINY = ["--n", "1", "--width", "0.25"]


@pytest.fixture(autouse=True)
def _once(backend):
    if backend.name != "numpy":
        pytest.skip("the command line is exercised once")


def test_help_shows_the_program_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith(f"usage: {PROG} ")
    out = " ".join(out.split())  # as wrapped for any terminal width
    for shown in ("(default: 3)", "(default: 15)", "(default: 128)", "(default: 0.1)",
                  "(default: 0.0005)", "(default: cosine)", "(default: numpy",
                  "{cosine,step,constant}", "{post,bn_after_add,", "{float32,float64}",
                  "{numpy,array_api_strict,", "--resume PATH", ".safetensors"):
        assert shown in out, shown
    for markup in ("``", ":class:", ":func:", "(default: None)", "%("):
        assert markup not in out, markup


@pytest.mark.parametrize("args,message", [
    (["--width", "0"], "argument --width: must be finite and > 0, got 0"),
    (["--width", "-0.5"], "argument --width: must be finite and > 0, got -0.5"),
    (["--width", "nan"], "argument --width: must be finite and > 0, got nan"),
    (["--n", "0"], "argument --n: must be >= 1, got 0"),
    (["--n", "1.5"], "argument --n: expected a whole number, got '1.5'"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--lr", "-0.1"], "argument --lr: must be finite and >= 0, got -0.1"),
    (["--lr", "inf"], "argument --lr: must be finite and >= 0, got inf"),
    (["--weight-decay=-1e-4"], "argument --weight-decay: must be finite and >= 0"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--schedule", "linear"], "argument --schedule: invalid choice: 'linear'"),
    (["--order", "sideways"], "argument --order: invalid choice: 'sideways'"),
    (["--backend", "nonsense"], "argument --backend: invalid choice: 'nonsense'"),
    (["--save", "{tmp}/missing/run.safetensors"], "argument --save: the folder "
                                                   "'{tmp}/missing' of '{tmp}/missing/"),
    (["--save", "{tmp}"], "argument --save: '{tmp}' is a folder"),
    (["--resume", "{tmp}/none.safetensors"], "argument --resume: "),
])
def test_bad_arguments_fail_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(data, "load_digits", no_work)
    monkeypatch.setattr(miniresnet.train, "fit", no_work)
    with pytest.raises(SystemExit) as info:
        main(TINY + [a.format(tmp=tmp_path) for a in args])
    captured = capsys.readouterr()
    assert info.value.code == 2 and captured.out == ""
    assert f"{PROG}: error: {message.format(tmp=tmp_path)}" in captured.err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root may write into any folder")
def test_an_unwritable_save_folder_fails_at_once(tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as info:
            main(TINY + ["--save", str(tmp_path / "run.safetensors")])
    finally:
        tmp_path.chmod(0o700)
    assert info.value.code == 2 and "is not writable" in capsys.readouterr().err


def _interrupt_in_epoch(monkeypatch, epoch):
    """Ctrl-C while epoch ``epoch`` evaluates (its training steps done, nothing saved yet)."""
    calls = []
    real = miniresnet.train.evaluate

    def evaluate(*args, **kwargs):
        calls.append(None)
        if len(calls) == epoch + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(miniresnet.train, "evaluate", evaluate)


def test_ctrl_c_says_what_was_saved_and_resume_continues_the_run(tmp_path, monkeypatch, capsys):
    options = TINY + ["--epochs", "3", "--lr", "0.05", "--seed", "1", "--schedule", "step",
                      "--batch-size", "256"]
    full = main(options + ["--save", str(tmp_path / "full.safetensors")])
    path = str(tmp_path / "run.safetensors")
    _interrupt_in_epoch(monkeypatch, 1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(options + ["--save", path])
    assert info.value.code == 130
    assert capsys.readouterr().err == (f"interrupted in epoch 1: {path} holds the model after "
                                       f"epoch 0 (continue with {PROG} --resume {path})\n")
    monkeypatch.undo()
    assert load_checkpoint(path).epoch == 1
    rest = main(["--resume", path, "--save", path])  # the run's settings come with it
    assert f"from {path} at epoch 1" in capsys.readouterr().out
    assert rest.records == full.records[1:]
    finished, reference = load_checkpoint(path), load_checkpoint(tmp_path / "full.safetensors")
    assert finished.epoch == reference.epoch == 3
    for name, value in reference.model.state_dict().items():
        np.testing.assert_array_equal(mr.to_numpy(finished.model.state_dict()[name]),
                                      mr.to_numpy(value), err_msg=name)


def test_ctrl_c_before_anything_was_saved(monkeypatch, capsys):
    _interrupt_in_epoch(monkeypatch, 0)
    with pytest.raises(SystemExit) as info:
        main(TINY + ["--epochs", "2"])
    assert info.value.code == 130
    assert capsys.readouterr().err == "interrupted in epoch 0: nothing was saved (no --save)\n"


def test_resume_checks_its_checkpoint_and_options(tmp_path, capsys):
    path = str(tmp_path / "run.safetensors")
    main(TINY + ["--epochs", "1", "--save", path])
    for args, message in [
        (["--n", "2", "--plain"], "argument --resume: the model comes from the checkpoint; do "
                                  "not give --n, --plain"),
        (["--epochs", "1"], "argument --epochs: the checkpoint already holds 1 epochs; ask for "
                            "more than 1"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(["--resume", path, *args])
        assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow on the way
def test_divergence_exits_with_its_message(capsys):
    with pytest.raises(SystemExit) as info:
        main(TINY + ["--epochs", "2", "--lr", "1e30"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"{PROG}: fit: the loss became nan at epoch 0, step ")
    assert err.endswith("; nothing was saved (no --save)\n")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs POSIX signals")
def test_ctrl_c_in_a_real_process(tmp_path):
    path = tmp_path / "run.safetensors"
    env = {**os.environ, "MINIRESNET_BACKEND": "numpy"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "miniresnet.train", *TINY, "--epochs", "10000", "--save",
         str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # (the default disposition in the child: where SIGINT is ignored, e.g. in a background
    # job, Python would not install its Ctrl-C handler)
    try:
        lines = []
        while not (line := proc.stdout.readline()).startswith("epoch   0"):
            assert line, f"the run ended early: {lines} {proc.stderr.read()}"
            lines.append(line)
        proc.send_signal(signal.SIGINT)  # during a later epoch: epoch 0 is done and saved
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    saved = load_checkpoint(path).epoch - 1
    assert proc.returncode == 130
    assert err == (f"interrupted in epoch {saved + 1}: {path} holds the model after epoch "
                   f"{saved} (continue with {PROG} --resume {path})\n")
    assert "Traceback" not in out + err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]
