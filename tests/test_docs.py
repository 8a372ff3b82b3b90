"""The README is the front door: it must keep up with the code it describes."""

from pathlib import Path

from config.settings import VARIABLES

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_the_readme_documents_every_setting():
    missing = [var.name for var in VARIABLES if f"| `{var.name}` |" not in README]
    assert not missing, f"README's configuration table lacks {missing}"


def test_the_readme_gives_the_two_commands_first():
    first_block = README.split("```", 2)[1]
    assert "make run" in first_block and "make test" in first_block
