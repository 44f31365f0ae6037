"""DESIGN §2's layout, as the imports say it: services → workflows → ml, and nothing in ml/ knows SQL or MQTT."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SQL_AND_MQTT = {"sqlalchemy", "psycopg", "alembic", "paho", "amqtt", "fastapi", "starlette", "uvicorn"}
# what workflows/ uses besides ml and itself: plain data libraries, no framework (Evidently and pandas are ml's)
WORKFLOW_LIBRARIES = {"numpy", "orjson", "pydantic"}


def imported(folder: str) -> dict[str, set[str]]:
    """Each top-level package a module of ``folder`` imports (function-level imports included), by module."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        roots = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = roots - set(sys.stdlib_module_names) - {"__future__"}
    return found


def test_ml_knows_nothing_of_the_layers_above_it_or_of_sql_and_mqtt() -> None:
    found = imported("ml")
    assert len(found) > 50 and "torch" in set().union(*found.values())  # the folder is where this test looks
    wrong = {m: r & ({"services", "workflows"} | SQL_AND_MQTT) for m, r in found.items()}
    assert not {m: r for m, r in wrong.items() if r}


def test_workflows_import_ml_their_own_interfaces_and_plain_data_libraries_only() -> None:
    found = imported("workflows")
    assert "workflows/retrain.py" in found and "ml" in found["workflows/retrain.py"]
    wrong = {m: r - {"ml", "workflows"} - WORKFLOW_LIBRARIES for m, r in found.items()}
    assert not {m: r for m, r in wrong.items() if r}
