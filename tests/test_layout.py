"""The house a newcomer walks: dependencies run one way (server -> app -> api -> db), the
imports people rely on keep working, and the README stays short."""

import ast
from pathlib import Path

import pytest

from service import db
from service.app import create_app
from service.db import close_pool, get_db, open_pool

SERVICE = Path(__file__).resolve().parent.parent / "service"
README = SERVICE.parent / "README.md"
# What each layer may not import: the layers above it.
FORBIDDEN = {
    "db": ("service.app", "service.api", "service.server", "service.observability"),
    "api": ("service.app", "service.server"),
    "observability": ("service.app", "service.api", "service.server", "service.db"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("layer", FORBIDDEN)
def test_a_layer_imports_nothing_from_the_layers_above_it(layer):
    offending = {
        f"{path.relative_to(SERVICE.parent)}: {name}"
        for path in (SERVICE / layer).rglob("*.py")
        for name in imported_modules(path)
        if name.startswith(FORBIDDEN[layer])
    }
    assert not offending


def test_the_public_imports_open_a_pool_with_the_readiness_fields(make_settings):
    app = create_app(make_settings())
    pool = open_pool(app)
    try:
        assert set(pool.stats()) == {"max", "size", "in_use", "idle", "waiting"}
        with app.app_context(), get_db(autocommit=True) as cur:
            cur.execute("SELECT 1 AS one")
            assert cur.fetchone() == {"one": 1}
    finally:
        close_pool(app)
    assert db.EXTENSION not in app.extensions


def test_the_readme_stays_under_10_kb():
    assert README.stat().st_size < 10 * 1024
