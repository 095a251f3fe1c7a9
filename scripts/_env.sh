# Sourced by the scripts: create .venv if missing, install the project, find the data.
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.jbackprop-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[test]"
  touch "$stamp"
fi
# Offline machines keep a copy of the data sets beside the checkout.
if [ -z "${JBACKPROP_DATA:-}" ] && [ -d ../shared/data ]; then
  JBACKPROP_DATA="$(cd ../shared/data && pwd)"
  export JBACKPROP_DATA
fi
