#!/usr/bin/env bash
# Validates Trellis' Kubernetes output against the Kubernetes schemas, offline:
#   - every golden output of `trellis inject` (control/tests/fixtures/inject/*.expected.yaml),
#     with `kind: List` documents validated item by item (the tool has no schema for List);
#   - the kustomize base, as `kubectl kustomize deploy/kubernetes` renders it.
# MutatingWebhookConfiguration, ClusterRole & co. are in the schemas and validate like the rest.
# Usage: .ci/validate-k8s.sh   (K8S_VERSION=1.31.0 to pick another schema version)
set -euo pipefail
cd "$(dirname "$0")/.."

# >= 1.29: native sidecars (init containers with restartPolicy: Always) are on by default.
K8S_VERSION="${K8S_VERSION:-1.30.0}"

if ! command -v kubernetes-validate >/dev/null; then
  if ! python3 -m pip --version >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "validate-k8s: installing python3-pip (Debian)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  echo "validate-k8s: installing kubernetes-validate (PyPI)"
  python3 -m pip install --quiet kubernetes-validate 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages kubernetes-validate
fi
# pip may install the script outside PATH (user installs); find it through Python if so.
VALIDATE=(kubernetes-validate)
command -v kubernetes-validate >/dev/null || VALIDATE=(python3 -m kubernetes_validate)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Expand List documents into their items (PyYAML comes with kubernetes-validate).
expand_lists() {
  python3 - "$1" "$2" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]
out = []
for d in docs:
    if isinstance(d, dict) and d.get("kind") == "List":
        out.extend(d.get("items") or [])
    else:
        out.append(d)
yaml.safe_dump_all(out, open(sys.argv[2], "w"), sort_keys=False)
PY
}

files=()
shopt -s nullglob
for f in control/tests/fixtures/inject/*.expected.yaml; do
  out="$work/$(basename "$f")"
  expand_lists "$f" "$out"
  files+=("$out")
done
if [ "${#files[@]}" -eq 0 ]; then
  echo "validate-k8s: no golden outputs found under control/tests/fixtures/inject" >&2
  exit 1
fi

if command -v kubectl >/dev/null; then
  kubectl kustomize deploy/kubernetes > "$work/kustomize-deploy-kubernetes.yaml"
  files+=("$work/kustomize-deploy-kubernetes.yaml")
  # An overlay moving the image to a private registry moves the injected sidecar's too.
  mkdir "$work/overlay"
  printf '%s\n' "resources:" "- $(realpath --relative-to="$work/overlay" deploy/kubernetes)" "images:" "- name: ghcr.io/trellis-mesh/trellis" \
    "  newName: registry.example/mesh/trellis" "  newTag: 9.9.9" > "$work/overlay/kustomization.yaml"
  rendered="$(kubectl kustomize "$work/overlay")"
  for want in "image: registry.example/mesh/trellis:9.9.9" "value: registry.example/mesh/trellis:9.9.9"; do
    if ! grep -qF "$want" <<<"$rendered"; then
      echo "validate-k8s: an overlay's images: did not give '$want'" >&2
      exit 1
    fi
  done
  if grep -q "ghcr.io/trellis-mesh" <<<"$rendered"; then
    echo "validate-k8s: the overlay still names ghcr.io/trellis-mesh somewhere" >&2
    exit 1
  fi
else
  echo "validate-k8s: skipped: kubectl not installed, deploy/kubernetes not rendered"
fi

echo "validate-k8s: kubernetes-validate --strict -k $K8S_VERSION on ${#files[@]} files"
"${VALIDATE[@]}" --strict --quiet -k "$K8S_VERSION" "${files[@]}"
echo "validate-k8s: ok"
