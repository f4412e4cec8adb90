#!/bin/sh
# Regenerate requirements.lock (every distribution pinned, with its sha256 hashes) and
# deploy/sbom.cdx.json (CycloneDX) from the set of packages installed in the tested .venv
# (`make test` installs it: pip install -e '.[test]'). Run from the repository root after
# `make test` passed:  sh deploy/lock.sh
# Needs uv (installed in .venv with the test extras) and cyclonedx-py (`pip install cyclonedx-bom`
# in any other environment; CYCLONEDX=/path/to/cyclonedx-py to point at it).
# Install from the lock (Linux x86_64, CPython 3.11, as tested):
#   python -m pip install --require-hashes -r requirements.lock && python -m pip install --no-deps -e .
set -eu
VENV=${VENV:-.venv}
CYCLONEDX=${CYCLONEDX:-cyclonedx-py}
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v '^#' > .tested-set.txt
trap 'rm -f .tested-set.txt' EXIT
# the tested versions as constraints: the lock resolves pyproject.toml to exactly the set that ran
"$VENV/bin/uv" pip compile pyproject.toml --extra test --generate-hashes --constraint .tested-set.txt \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match \
    --custom-compile-command "sh deploy/lock.sh" --quiet -o requirements.lock "$@"
"$CYCLONEDX" requirements requirements.lock --pyproject pyproject.toml --output-reproducible -o deploy/sbom.cdx.json
