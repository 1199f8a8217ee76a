"""Command-line mistakes: one line saying what is wrong plus a usage hint on stderr, exit 2, never a traceback."""

from __future__ import annotations

import pytest

from lungmask_kit.cli.app import main

MISTAKES = [
    ([], "no command given"),
    (["segment"], "Missing argument"),
    (["segment", "in"], "Missing option '--out'"),
    (["segment", "in", "-o", "out", "--bogus"], "No such option: --bogus"),
    (["segment", "in", "-o", "out", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["segment", "in", "-o", "out", "--batch-size", "many"], "Invalid value for '--batch-size'"),
    (["segment", "in", "-o", "out", "--min-est-dice", "2"], "Invalid value for '--min-est-dice'"),
    (["segment", "in", "-o"], "Option '-o' requires an argument"),
    (["segmnet", "in"], "No such command 'segmnet'"),
    (["variants", "-o", "out", "--jobs", "-1"], "Invalid value for '--jobs'"),
    (["calibrate", "data", "--val-fraction", "1.5"], "Invalid value for '--val-fraction'"),
    (["classify", "m.parquet", "-o", "out", "--variant", "lung"], "'lung' is not one of 'original', 'lungs', 'nolungs', 'all'"),
    (["classify", "m.parquet", "-o", "out", "--normalize", "z"], "Invalid value for '--normalize'"),
    (["classify", "m.parquet", "-o", "out", "--channels", "bgr"], "Invalid value for '--channels'"),
    (["train", "data", "-o", "out", "--encoder-weights", "hub"], "Invalid value for '--encoder-weights'"),
    (["classify", "m.parquet", "-o", "out", "--init", "hub"], "Invalid value for '--init'"),
    (["classify", "m.parquet", "-o", "out", "--seeds", "0"], "Invalid value for '--seeds'"),
    (["publish", "run"], "Missing option '--out'"),
    (["report"], "Missing argument 'OUT'"),
    (["stats"], "Missing argument 'DIR'"),
    (["evaluate"], "Missing argument"),
    (["segment", "in", "-o", "out", "--engine", "spark"], "Invalid value for '--engine'"),
    (["merge"], "Missing argument 'OUT'"),
]


@pytest.mark.parametrize("argv, message", MISTAKES, ids=[" ".join(a) or "(nothing)" for a, _ in MISTAKES])
def test_usage_mistakes_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2, captured.err
    assert lines[0].startswith("lungkit: error: ") and message in lines[0]
    assert lines[1].startswith("Try 'lungkit") and lines[1].endswith(" -h' for help.")
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("argv", [["-h"], ["--help"], ["segment", "-h"], ["variants", "--help"]])
def test_short_and_long_help(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Usage:" in out and "--help" in out


def test_nothing_given_prints_the_help_then_the_error(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("Usage: lungkit") == 1 and "segment" in captured.out


def test_completion_can_be_installed(capsys):
    assert main(["--help"]) == 0
    assert "--install-completion" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["classify", "missing.parquet", "-o", "{tmp}/out"], "manifest not found"),
    (["stats", "{tmp}/nowhere"], "input folder not found"),
    (["train", "{tmp}/nowhere", "-o", "{tmp}/out", "--in-channels", "2"], "in_channels must be 1 or 3"),
    (["segment", "{example}", "-o", "{tmp}/out", "--device", "tpu", "-q"], "unknown device"),  # -q: no busy-machine warning
    (["segment", "{example}", "-o", "{tmp}/out", "--shard", "3/2", "-q"], "--shard takes K/N"),
    (["segment", "{example}", "-o", "{tmp}/out", "--shard", "1/2", "--report", "-q"], "--report needs the whole run"),
    (["merge", "{tmp}/nowhere"], "output folder not found"),
    (["merge", "{tmp}"], "holds no finished shard"),
])
def test_library_errors_are_one_line_exit_2(argv, message, tmp_path, example_images, capsys):
    assert main([a.format(tmp=tmp_path, example=example_images) for a in argv]) in (2, 3)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("command", [["classify", "{m}", "-o", "{tmp}/cls"], ["evaluate", "{m}", "--truth", "{tmp}", "-o", "{tmp}/ev"],
                                     ["report", "{m}"], ["variants", "{m}", "-o", "{tmp}/var"],
                                     ["publish", "{m}", "-o", "{tmp}/ds"]])
@pytest.mark.parametrize("content", ["text", "plain parquet", "run folder with a text manifest"])
def test_a_file_that_is_not_a_lungkit_manifest_is_one_line(tmp_path, capsys, command, content):
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = tmp_path / "junk.parquet"
    if content == "run folder with a text manifest":  # every command also takes the run folder itself
        m = tmp_path / "run"
        m.mkdir()
        (m / "manifest.parquet").write_text("not parquet\n")
    elif content == "text":
        m.write_text("not parquet\n")
    else:
        pq.write_table(pa.table({"path": ["a.png"], "x": [1]}), m)
    assert main([a.format(m=m, tmp=tmp_path) for a in command]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("lungkit: error")]) == 1


COMMANDS = ["segment", "merge", "variants", "report", "publish", "classify", "train", "calibrate", "evaluate", "stats"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults_and_extras_in_panels_with_readable_metavars(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for line in out.splitlines():
        text = line.strip("│ ").rstrip()
        assert not text.endswith(" .") and "(default: )" not in text  # a default eaten by Rich markup
        assert "<list[" not in text or "DATA" in text  # options name what one value is (arguments show their name)
        if "--help" not in text:
            assert "<bool>" not in text
    if command == "segment":
        assert "pip install 'lungkit[ray]'" in out and "(default: the model's, 0.5)" in out
        for panel in ("Input and output", "Model", "Quality control", "Performance", "Cluster"):
            assert f"─ {panel} ─" in out


def test_the_cli_imports_no_heavy_library_until_a_command_runs():
    import subprocess
    import sys

    code = ("import sys, lungmask_kit.cli.app; "
            "print(sorted(m for m in ('torch', 'cv2', 'pyarrow', 'pydicom', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_every_example_in_the_help_fits_80_columns():
    """Examples that wrapped at 80 columns lost their indentation and read as prose; each line of a command's
    docstring example (and its continuation lines) fits the 78 columns rich leaves inside an 80-column terminal."""
    import inspect

    from lungmask_kit.cli.app import app

    long = []
    for command in app.registered_commands:
        lines = inspect.cleandoc(command.callback.__doc__ or "").splitlines()
        for i, line in enumerate(lines):
            example = line.lstrip().startswith(("lungkit ", "Example: lungkit")) or \
                (i and lines[i - 1].rstrip().endswith("\\"))
            if example and len(line) > 78:
                long.append(line)
    assert not long, long
