"""The `certsync-lab` command: the local stack (embedded PostgreSQL, Samba AD DC, Exchange Online
emulator) on its own, and the demo that runs the `certsync` DAG against it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import click

from certsync_lab.compose import compose
from certsync_lab.emulator.cli import emulator

HOME_OPTION = click.option(
    "--home",
    type=click.Path(path_type=Path),
    default=Path(".certsync"),
    show_default=True,
    help="The lab's data.",
)
USERS_OPTION = click.option(
    "--users", type=int, default=300, show_default=True, help="Size of the seeded population."
)


def _stack(home: Path, users: int):  # type: ignore[no-untyped-def]
    from certsync_lab.stack import LabStack

    return LabStack(home=home, users=users)


@click.group()
def main() -> None:
    """certsync's lab: real local stand-ins for Active Directory, PostgreSQL and Exchange Online."""


main.add_command(emulator)
main.add_command(compose)


def write_env_file(path: Path, environment: dict[str, str]) -> None:
    """Write `export NAME=value` lines, readable by the owner only (they hold passwords)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: tighten it every time
    with os.fdopen(fd, "w") as out:
        out.writelines(f"export {k}={shlex.quote(v)}\n" for k, v in environment.items())


@main.command("up")
@HOME_OPTION
@USERS_OPTION
def lab_up(home: Path, users: int) -> None:
    """Start the lab (a running lab is left as it is) and write its settings to HOME/lab.env."""
    from certsync_lab.stack import DATABASE

    stack = _stack(home, users)
    was_running = stack.running()
    stack.up()
    env_file = stack.home / "lab.env"
    write_env_file(env_file, stack.environment())
    click.echo(f"lab {'already running' if was_running else 'up'} in {stack.home}")
    click.echo(f"  PostgreSQL  127.0.0.1:{stack.postgres.port} (database {DATABASE})")
    click.echo(f"  LDAP        {stack.samba.ldap_url} (users in {stack.samba.users_ou})")
    click.echo(f"  Exchange    {stack.emulator.url} (tenant {stack.emulator.tenant_id})")
    click.echo(f"  settings    {env_file} (owner only: it holds the LDAP password)")
    click.echo(f"run the sync with `certsync-lab exec --home {stack.home} certsync run`")


@main.command("down")
@HOME_OPTION
def lab_down(home: Path) -> None:
    """Stop the lab's services (their data stays)."""
    _stack(home, 0).down()
    click.echo("lab stopped")


@main.command()
@HOME_OPTION
@USERS_OPTION
def demo(home: Path, users: int) -> None:
    """Start the lab, run the `certsync` DAG once with Airflow, print what happened, stop the lab."""
    from certsync_lab.demo import run_demo

    with _stack(home, users) as stack:
        click.echo(
            f"lab up: {users} users in Samba AD, emulator at {stack.emulator.url}, data in {stack.home}"
        )
        if not run_demo(stack, echo=click.echo):
            raise click.ClickException(f"the DAG run failed; its log is in {stack.home / 'last-dag-run.log'}")


@main.command("exec", context_settings={"ignore_unknown_options": True})
@HOME_OPTION
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(home: Path, command: tuple[str, ...]) -> None:
    """Run COMMAND with the running lab's settings in its environment (e.g. `certsync run`)."""
    stack = _stack(home, 0)
    if not stack.running():
        raise click.ClickException(f"no lab is running in {stack.home}: run `certsync-lab up` first")
    stack.up()
    # The venv's commands (certsync itself) are found even when the venv is not activated.
    path = os.pathsep.join(filter(None, (str(Path(sys.executable).parent), os.environ.get("PATH"))))
    try:
        code = subprocess.call(list(command), env={**os.environ, **stack.environment(), "PATH": path})
    except FileNotFoundError:
        raise click.ClickException(f"command not found: {command[0]}") from None
    sys.exit(code)


if __name__ == "__main__":
    main()
