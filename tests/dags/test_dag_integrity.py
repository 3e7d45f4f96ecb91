"""Every DAG parses offline, cheaply, and follows the house rules (tags, retries, docs)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.conftest import REPO


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(dag_folder=str(REPO / "dags"))


def test_no_import_errors(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}
    assert "certsync" in dagbag.dags


def test_every_dag_has_tags_docs_and_retries(dagbag: DagBag) -> None:
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 200, f"{dag_id} has no Markdown documentation"
        for task in dag.tasks:
            assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"
            func = getattr(task, "python_callable", None) or task.partial_kwargs.get("python_callable")
            assert func is not None and (func.__doc__ or "").strip(), (
                f"{dag_id}.{task.task_id} has no docstring"
            )


def test_certsync_shape(dagbag: DagBag) -> None:
    dag = dagbag.dags["certsync"]
    order = {t.task_id: {u.task_id for u in t.upstream_list} for t in dag.tasks}
    assert order["extract"] == {"begin"}
    assert order["validate"] == {"begin", "extract", "read_recipients"}
    assert order["publish"] == {"begin", "plan"}
    # Beside publish, not before it: publishing does not need the unchanged users' results.
    assert order["carry_over"] == {"begin", "plan"}
    assert dag.max_active_runs == 1


def test_finish_is_a_teardown_whose_failure_fails_the_run(dagbag: DagBag) -> None:
    """A failed stage or a failed action must show: finish runs whatever happened after begin,
    and its failure is the DAG run's."""
    dag = dagbag.dags["certsync"]
    finish = dag.get_task("finish")
    assert finish.is_teardown and finish.on_failure_fail_dagrun
    assert dag.get_task("begin").is_setup
    assert {t.task_id for t in finish.upstream_list} == {"begin", "publish", "carry_over"}
    # Airflow judges a run by its leaves: any task after finish would hide finish's failure.
    assert finish.downstream_list == [], [t.task_id for t in finish.downstream_list]


def test_timeouts_retries_and_the_failure_callback_are_set(dagbag: DagBag) -> None:
    dag = dagbag.dags["certsync"]
    assert dag.dagrun_timeout is not None and dag.on_failure_callback is not None
    for task in dag.tasks:
        assert task.execution_timeout is not None, task.task_id
        assert task.execution_timeout < dag.dagrun_timeout
        assert task.retry_exponential_backoff and task.max_retry_delay, task.task_id


def test_the_asset_is_announced_through_an_alias(dagbag: DagBag) -> None:
    """An outlet asset would get an event on every success; through the alias, finish adds one only
    when the run published something."""
    from airflow.sdk import AssetAlias

    outlets = dagbag.dags["certsync"].get_task("finish").outlets
    assert [type(o) for o in outlets] == [AssetAlias]


def test_dag_file_has_no_heavy_top_level_imports() -> None:
    """Parsing must not import the pipeline (Postgres, ldap3, msal): the scheduler parses often."""
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]);"
        "heavy = [m for m in ('certsync.pipeline', 'ldap3', 'msal', 'psycopg') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "dags" / "certsync_sync.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "", f"imported at parse time: {out.stdout.strip()}"


def test_certsync_takes_its_connection_ids_as_params(dagbag: DagBag) -> None:
    """The connection ids are run params whose defaults are the names a deployment already uses."""
    params = dagbag.dags["certsync"].params
    assert {name: params[name] for name in ("ldap_conn_id", "exchange_conn_id", "postgres_conn_id")} == {
        "ldap_conn_id": "certsync_ldap",
        "exchange_conn_id": "certsync_exchange",
        "postgres_conn_id": "certsync_postgres",
    }
    assert params["dry_run"] is False and params["allow_mass_removal"] is False
    for name in ("ldap_conn_id", "exchange_conn_id", "postgres_conn_id"):
        assert params.get_param(name).description, f"param {name} has no description"


@pytest.mark.parametrize("conn_id", ["", "two words", "a/b"])
def test_a_conn_id_param_must_be_an_airflow_id(dagbag: DagBag, conn_id: str) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    param = dagbag.dags["certsync"].params.get_param("postgres_conn_id")
    assert param.resolve(value="certsync_postgres.eu-1") == "certsync_postgres.eu-1"
    with pytest.raises(ParamValidationError):
        param.resolve(value=conn_id)


def test_every_certsync_task_passes_the_run_conn_ids() -> None:
    """Each task's stage gets this run's connection ids, not the fixed defaults."""
    import ast

    tree = ast.parse((REPO / "dags" / "certsync_sync.py").read_text())
    stages = {"begin_run", "finish_run", "run_stage"}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") in stages]
    assert len(calls) == 9
    for call in calls:
        assert any(k.arg == "conn_ids" for k in call.keywords), ast.unparse(call)


@pytest.mark.parametrize(
    ("conf", "param"),
    [
        ({"dry_run": "yes"}, "dry_run"),
        ({"allow_mass_removal": 1}, "allow_mass_removal"),
        ({"ldap_conn_id": ""}, "ldap_conn_id"),
    ],
)
def test_params_of_the_wrong_type_are_refused_before_the_run_starts(dagbag: DagBag, conf, param) -> None:
    """What `airflow dags trigger --conf` and the UI's trigger form go through: no run is created."""
    from airflow.sdk.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    # What the scheduler's create_dagrun checks, on the DAG as the scheduler holds it.
    served = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dagbag.dags["certsync"]))
    with pytest.raises(ParamValidationError, match=f"param {param}"):
        served.params.deep_merge(conf).validate()
    served.params.deep_merge({"dry_run": True}).validate()


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"dry-run": True}, "unknown param 'dry-run' (did you mean 'dry_run'?)"),
        ({"allow_mass_removals": True}, "'allow_mass_removals' (did you mean 'allow_mass_removal'?)"),
        ({"colour": 1}, "unknown param 'colour'; the params are allow_mass_removal, dry_run,"),
    ],
)
def test_a_conf_key_that_is_no_param_is_refused_naming_the_nearest(dagbag: DagBag, conf, message) -> None:
    """Airflow passes unknown conf keys through: a misspelt dry_run would otherwise publish for real."""
    from airflow.sdk.exceptions import AirflowFailException

    from certsync.airflow.adapter import check_conf

    with pytest.raises(AirflowFailException) as refused:
        check_conf(conf, dagbag.dags["certsync"].params.keys())
    assert message in str(refused.value)
    check_conf({"dry_run": True, "postgres_conn_id": "x"}, dagbag.dags["certsync"].params.keys())
    check_conf(None, dagbag.dags["certsync"].params.keys())
