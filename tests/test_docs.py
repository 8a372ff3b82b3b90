"""The README is the front door: it must keep up with the code it describes."""

from pathlib import Path

from pydantic.fields import FieldInfo

from config.settings import VARIABLES, accepted_range, number

README = (Path(__file__).parent.parent / "README.md").read_text()


def table_row(name: str, field: FieldInfo) -> str:
    """The README's row for one variable: name, default, accepted range, description. A derived
    default is the first line of its factory's docstring; an empty one (no URL, no token) is
    "unset"."""
    if field.default_factory is not None:
        default = field.default_factory.__doc__.splitlines()[0]
    elif field.default in ("", (), None):
        default = "unset"
    else:
        default = number(field.default)
    return f"| `{name}` | {default} | {accepted_range(field)} | {field.description} |"


def test_the_readme_configuration_table_is_the_settings_model():
    """Every variable of config.settings.Settings, in its order, as the model says it: a change to
    either side fails here until the other follows (the message holds the table to paste)."""
    expected = [table_row(name, field) for name, field in VARIABLES.items()]
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    assert table == expected, "README's configuration table should be:\n" + "\n".join(expected)


def test_the_readme_gives_the_two_commands_first():
    first_block = README.split("```", 2)[1]
    assert "make run" in first_block and "make test" in first_block
