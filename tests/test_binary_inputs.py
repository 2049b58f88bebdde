"""A binary file where steward expects a text file: exit 2 and one message naming the file, never a traceback."""

import pytest
from typer.testing import CliRunner

from steward.cli import app
from tests.conftest import JOBS

BINARY = bytes(range(256)) * 4  # not UTF-8: 0x80 cannot start a character


@pytest.mark.parametrize(
    "command",
    [
        ["bench", "compare", "{file}", "{file}"],
        ["validate", str(JOBS / "quickstart.yaml"), "--policy", "{file}"],
        ["policy", "explain", "--policy", "{file}"],
        ["validate", "{file}"],
    ],
    ids=["bench compare", "validate --policy", "policy explain", "validate"],
)
def test_a_binary_file_is_named_in_one_error(tmp_path, command):
    path = tmp_path / "garbage.bin"
    path.write_bytes(BINARY)
    result = CliRunner().invoke(app, [arg.format(file=path) for arg in command], env={"STEWARD_POLICY": None})
    assert result.exit_code == 2, result.output
    assert str(path) in result.output.replace("\n", "") and "Traceback" not in result.output
