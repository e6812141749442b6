#!/bin/sh
# Installs the FHIR R4 validator the agent's FHIR tests run every response through:
#   scripts/install-fhir-validator.sh VENV
# A Python virtual environment at VENV (created if missing; idempotent) with, from PyPI,
# fhir.resources 6.4.0 (the FHIR R4 4.0.1 resource models; they refuse unknown elements,
# missing required ones, wrong types and malformed primitives) on pydantic 1.10 (the major
# version fhir.resources 6 is built for). Needs python3 with venv (Debian's python3-venv).
set -eu

venv=${1:?usage: install-fhir-validator.sh VENV}
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import fhir.resources" 2>/dev/null; then
    exit 0
fi
echo "install-fhir-validator.sh: creating $venv (fhir.resources 6.4.0, pydantic 1.10.24)" >&2
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    "fhir.resources==6.4.0" "pydantic==1.10.24" >&2
"$venv/bin/python" -c "import fhir.resources" || {
    echo "install-fhir-validator.sh: fhir.resources does not import" >&2
    exit 1
}
