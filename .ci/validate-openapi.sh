#!/usr/bin/env bash
# Validates docs/api/openapi.yaml as an OpenAPI 3 document (openapi-spec-validator, offline):
# the document is the API's contract, and generators and clients refuse one that does not
# validate (an unquoted comma in a YAML flow mapping once split a description into a key).
# Usage: .ci/validate-openapi.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import openapi_spec_validator' 2>/dev/null; then
  echo "validate-openapi: installing openapi-spec-validator (PyPI)"
  python3 -m pip install --quiet openapi-spec-validator 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages openapi-spec-validator
fi
python3 -m openapi_spec_validator docs/api/openapi.yaml
