"""``moaflow <step>``: generated from the steps' signatures and docstrings, one way to run every step."""

import subprocess
import sys

import pytest

from moaflow import cli, steps


def test_every_step_has_a_generated_parser_with_help():
    """Each registered step's function builds a parser; every option has help text from the docstring."""
    for name in steps.STEPS:
        parser = cli.step_parser(name)
        options = [a for a in parser._actions if a.dest != "help"]
        assert options, name
        undocumented = [a.dest for a in options if not a.help]
        assert not undocumented, (name, undocumented)


def test_options_follow_the_annotations():
    parser = cli.step_parser("preprocess-plate")
    arguments = parser.parse_args(["--table", "t.parquet", "--plate", "Week1_22123", "--output-prefix", "p",
                                   "--sizes", "224", "299", "--grid", "2", "2", "--normalisation", "study",
                                   "--percentiles", "1", "99.9", "--empty-threshold", "50",
                                   "--empty-fraction", "0.002", "--controls"])
    assert arguments.sizes == [224, 299] and arguments.grid == [2, 2] and arguments.percentiles == [1.0, 99.9]
    assert arguments.controls is True and arguments.illumination is None
    with pytest.raises(SystemExit):   # a required setting left out is named by argparse
        parser.parse_args(["--table", "t.parquet"])


def test_the_hand_written_layer_is_only_threads():
    """The issue's bar: fewer than 40 hand-written options; here one (``--threads``)."""
    source = open(cli.__file__).read()
    assert source.count("add_argument(") == 3      # --threads, the step name, and the one generating loop


def test_a_bad_value_is_one_line_naming_it(tmp_path, capsys):
    status = cli.main(["check-folds", "--folds", str(tmp_path / "none.tsv"), "--index", str(tmp_path / "i.parquet"),
                       "--output", str(tmp_path / "out.tsv")])
    error = capsys.readouterr().err
    assert status == 1 and error.startswith("moaflow check-folds: error:") and "none.tsv" in error


def test_help_lists_every_step_without_importing_the_frameworks():
    result = subprocess.run([sys.executable, "-c", "import sys; from moaflow import cli\n"
                             "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
                             "print('keras' in sys.modules, 'tensorflow' in sys.modules)"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in steps.STEPS:
        assert name in result.stdout
    assert result.stdout.strip().endswith("False False")
