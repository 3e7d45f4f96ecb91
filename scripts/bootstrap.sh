#!/usr/bin/env bash
# Everything `make demo` and `make test` need on a fresh Debian machine: Samba's AD DC packages,
# OpenSSL, PostgreSQL and Redis servers and iproute2 (apt), a Python 3.11 virtual environment, and the
# locked Python packages of both distributions.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v samba >/dev/null 2>&1 || need_apt+=(samba-ad-dc samba-ad-provision)
command -v samba-tool >/dev/null 2>&1 || need_apt+=(samba-ad-provision)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# PostgreSQL and Redis servers: the compose test runs the stack's database and broker services with them.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need_apt+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# ldapsearch: bench/bench_extract.py reads the directory with it as the baseline.
command -v ldapsearch >/dev/null 2>&1 || need_apt+=(ldap-utils)
# ip (bridges and veth pairs between the compose test's namespaces).
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing system packages: ${need_apt[*]} (run as root, or: sudo apt-get install ${need_apt[*]})" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            python=$candidate
            break
        fi
    done
fi
if [ -z "$python" ]; then
    echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.certsync-installed
want=$(cat constraints.txt pyproject.toml lab/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # Both distributions, editable: the product (with Airflow) and the lab that tests and the demo use.
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[airflow,celery,test]' -e ./lab
    echo "$want" > "$stamp"
fi
