"""The CLI's temporary Prefect server: what its faster start keeps equal (issue 12).

Each server here is a real one (``mlflow_rollout.prefect_server``'s child,
uvicorn + Prefect's app) on its own ``PREFECT_HOME``, started from a separate
Python process with a clean environment, so the test process's own Prefect
settings (the suite's API server) play no part. The database a prepared start
gives is compared, through the API, with the one Prefect's own start-up
builds (``MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE=0``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support.rollout import Sandbox

REPO = Path(__file__).resolve().parent.parent

#: Starts a server on $PREFECT_HOME, reads every block type and schema through the API, stops it.
READ_BLOCKS = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import httpx
    from mlflow_rollout.prefect_server import TemporaryPrefectServer
    server = TemporaryPrefectServer(Path(os.environ["PREFECT_HOME"]))
    url = server.start()
    try:
        types = httpx.post(f"{url}/block_types/filter", json={}, timeout=30).json()
        schemas = httpx.post(f"{url}/block_schemas/filter", json={}, timeout=30).json()
    finally:
        server.stop()
    print(json.dumps({
        "types": sorted(t["slug"] for t in types),
        "schemas": sorted(s["checksum"] + " " + s["version"] for s in schemas),
    }))
""")


def clean_env(home: Path, template_dir: Path, *, prepared: bool = True, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_ROLLOUT_"))}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE_DIR": str(template_dir),
        "MLFLOW_ROLLOUT_PREFECT_DB_TEMPLATE": "1" if prepared else "0",
        "PYTHONPATH": str(REPO),
        **extra,
    })
    return env


def python(code: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_blocks(home: Path, template_dir: Path, *, prepared: bool = True) -> dict:
    return json.loads(python(READ_BLOCKS, clean_env(home, template_dir, prepared=prepared)).stdout.splitlines()[-1])


def server_log(home: Path) -> str:
    return (home / "mlflow-rollout-prefect-server.log").read_text()


@pytest.fixture(scope="module")
def prefects_own(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The block types and schemas of a database built by Prefect's own start-up."""
    base = tmp_path_factory.mktemp("prefect-own")
    blocks = read_blocks(base / "home", base / "no-template", prepared=False)
    assert blocks["types"] and blocks["schemas"], blocks
    assert (base / "home" / "memo_store.toml").is_file(), "Prefect's own start-up memoises its registration"
    assert not list((base / "home").glob("*.mlflow-rollout-blocks.json"))
    assert not (base / "no-template").exists()
    return blocks


def test_the_template_and_the_marked_database_hold_what_prefect_would_have_built(
    tmp_path: Path, prefects_own: dict
) -> None:
    templates = tmp_path / "templates"
    # 1. The first fresh home on a machine builds the template: migrated, blocks registered, marked.
    first = tmp_path / "first"
    assert read_blocks(first, templates) == prefects_own
    built = list(templates.glob("prefect-*.db"))
    assert len(built) == 1 and Path(f"{built[0]}.mlflow-rollout-blocks.json").is_file(), list(templates.iterdir())
    assert "database template saved to" in server_log(first)

    # 2. The next fresh home copies it (mark included) and starts with Prefect's registration off:
    #    Prefect's memo, written whenever its registration step runs, is never written.
    second = tmp_path / "second"
    blocks = read_blocks(second, templates)
    assert blocks == prefects_own
    assert "database copied from" in server_log(second)
    assert not (second / "memo_store.toml").exists()
    mark = json.loads((second / "prefect.db.mlflow-rollout-blocks.json").read_text())
    assert mark["rows"] == [len(prefects_own["types"]), len(prefects_own["schemas"])], mark

    # 3. A warm restart of the marked home: the same again, still without Prefect's registration step.
    assert read_blocks(second, templates)["types"] == prefects_own["types"]
    assert not (second / "memo_store.toml").exists()
    assert server_log(second).count("database copied from") == 1


def test_a_database_that_lost_its_blocks_is_registered_again(tmp_path: Path, prefects_own: dict) -> None:
    """A mark is believed only while the rows it counted are there (e.g. not after `prefect server database reset`)."""
    home, templates = tmp_path / "home", tmp_path / "templates"
    read_blocks(home, templates)
    con = sqlite3.connect(home / "prefect.db")
    try:
        with con:
            con.execute("DELETE FROM block_schema")
            con.execute("DELETE FROM block_type")
    finally:
        con.close()
    assert read_blocks(home, templates) == prefects_own


def test_an_unmarked_home_from_before_is_registered_once_then_starts_marked(tmp_path: Path, prefects_own: dict) -> None:
    """A home an older version (or `prefect server start`) built: no mark; the first start registers and marks it."""
    home, templates = tmp_path / "home", tmp_path / "templates"
    read_blocks(home, templates, prepared=False)  # Prefect's own start-up built this home
    assert not (home / "prefect.db.mlflow-rollout-blocks.json").exists()
    assert read_blocks(home, templates)["types"] == prefects_own["types"]
    assert (home / "prefect.db.mlflow-rollout-blocks.json").is_file()
    assert not templates.exists(), "only a fresh home's database becomes the template"


EARLY = textwrap.dedent("""
    import contextlib, json, os, sys
    from pathlib import Path
    from mlflow_rollout import prefect_server as ps
    ps.start_early()
    early = ps._early
    proc = early.process
    prefect_imported = "prefect" in sys.modules
    import httpx
    from prefect.settings import PREFECT_HOME, temporary_settings
    home = Path(os.environ["OTHER_HOME"]) if os.environ.get("OTHER_HOME") else None
    with temporary_settings(updates={PREFECT_HOME: home}) if home else contextlib.nullcontext():
        with ps.temporary_api() as url:
            healthy = httpx.get(f"{url}/health", timeout=10).status_code
    print(json.dumps({
        "prefect_imported_before_spawn": prefect_imported, "early_port": early.port, "url": url,
        "healthy": healthy, "early_gone": proc.poll() is not None,
        "taken": ps._early is None,
    }))
""")


def test_the_early_server_is_spawned_before_prefect_is_imported_and_taken_over(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home", tmp_path / "templates")
    out = json.loads(python(EARLY, env).stdout.splitlines()[-1])
    assert out["prefect_imported_before_spawn"] is False
    assert out["url"] == f"http://127.0.0.1:{out['early_port']}/api", out
    assert out["healthy"] == 200 and out["taken"] is True
    assert out["early_gone"] is True, "stopped at the end of temporary_api(), as its own server would be"


def test_an_early_server_on_another_home_is_stopped_and_a_right_one_started(tmp_path: Path) -> None:
    """Settings the early child could not see (here: a home set in code) mean its server is not the right one."""
    env = clean_env(tmp_path / "home", tmp_path / "templates", OTHER_HOME=str(tmp_path / "other"))
    out = json.loads(python(EARLY, env).stdout.splitlines()[-1])
    assert out["url"] != f"http://127.0.0.1:{out['early_port']}/api", out
    assert out["healthy"] == 200
    assert out["early_gone"] is True, "the early server is stopped when temporary_api() passes it over"
    assert (tmp_path / "other" / "prefect.db").is_file()


@pytest.mark.parametrize(("argv", "api_url", "expected"), [
    (["rollout", "--env", "good"], "", True),
    (["rollback", "--env", "good", "--reason", "r"], "", True),
    (["health", "--env", "good"], "", True),
    (["rollout", "--env", "nope"], "", False),  # bad input is reported before anything starts
    (["rollback", "--env", "good"], "", False),  # a usage error (no --reason)
    (["rollout", "--env", "good", "--help"], "", False),
    (["status", "--env", "good"], "", False),  # no flow, no Prefect API
    (["diagnose", "--env", "good"], "", False),
    (["rollout", "--env", "good"], "http://127.0.0.1:1/api", False),  # the user's own API
])
def test_which_commands_start_the_server_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], api_url: str, expected: bool
) -> None:
    import cli

    box = Sandbox(tmp_path, api_url="")
    box.write_environment("good")
    monkeypatch.setenv("MLFLOW_ROLLOUT_ENVIRONMENTS_DIR", str(box.env_dir))
    monkeypatch.setenv("PREFECT_API_URL", api_url)
    assert cli._needs_prefect_api(argv) is expected


def test_the_console_script_leaves_at_once_yet_runs_the_exit_handlers(tmp_path: Path) -> None:
    """`cli.main()` ends with os._exit: the exit code, the printed output and the atexit handlers stay."""
    flag = tmp_path / "atexit-ran"
    code = textwrap.dedent(f"""
        import atexit, cli
        atexit.register(lambda: open({str(flag)!r}, "w").write("ran"))
        cli.main(["status", "--env", "nope"])
    """)
    env = clean_env(tmp_path / "home", tmp_path / "templates", MLFLOW_ROLLOUT_ENVIRONMENTS_DIR=str(tmp_path / "envs"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bad input:" in proc.stdout and "unknown environment 'nope'" in proc.stdout, proc.stdout
    assert flag.read_text() == "ran"


def test_no_early_server_when_the_active_profile_names_an_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`prefect config set PREFECT_API_URL=…` writes the profile, not the environment: no server started for nothing."""
    from mlflow_rollout import prefect_server as ps

    home = tmp_path / "home"
    home.mkdir()
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    profiles = home / "profiles.toml"
    profiles.write_text('active = "work"\n[profiles.work]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n'
                        '[profiles.local]\nPREFECT_LOGGING_LEVEL = "DEBUG"\n')
    assert ps._profile_sets_api_url() is True
    ps.start_early()
    assert ps._early is None, "spawned a server although the profile names an API"
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert ps._profile_sets_api_url() is False
    profiles.write_text("not = [toml")
    assert ps._profile_sets_api_url() is False
