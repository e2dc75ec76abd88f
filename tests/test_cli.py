from typer.testing import CliRunner

from quantize_cli import SCHEMES
from quantize_cli.cli import app

runner = CliRunner()


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("convert", "calibrate", "eval", "reload", "inspect", "schemes"):
        assert command in result.output


def test_schemes_table_lists_all_ten() -> None:
    result = runner.invoke(app, ["schemes"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    names = [row.split("│")[1].strip() for row in rows]
    names = [n for n in names if n]
    assert names == list(SCHEMES)
    ten = {"int8", "int4", "nf4", "fp4", "nf8", "fp8", "nvfp4", "mxfp4", "fp16", "bf16"}
    assert ten <= set(names)
    assert set(names) - ten == {"int8-static"}  # the calibrated W8A8 scheme
    nf4 = next(row for row in rows if row.split("│")[1].strip() == "nf4")
    assert "4.5" in nf4 and "64" in nf4


def test_error_lines_keep_brackets(tmp_path) -> None:
    """A user's text in an error (here a path with brackets) is printed as is, not eaten as rich markup."""
    missing = str(tmp_path / "model[v2]")
    result = CliRunner().invoke(app, ["convert", missing])
    assert result.exit_code == 2
    assert f"model not found: {missing}" in result.stderr.replace("\n", "")
