#!/usr/bin/env bash
# Mints one client certificate from the Trellis control plane's CA, for the idle-mTLS
# scenario (6b): a mesh peer "web" as a Trellis sidecar would present it.
#   ECDSA P-256, CA:FALSE, digitalSignature, EKU clientAuth+serverAuth,
#   exactly one URI SAN: spiffe://TRUST_DOMAIN/ns/bench/sa/web
# Usage: mint-client-cert.sh CONTROL_DATA_DIR OUT_DIR   (writes OUT_DIR/web.crt, OUT_DIR/web.key)
set -euo pipefail
data=${1:?usage: mint-client-cert.sh CONTROL_DATA_DIR OUT_DIR}; out=${2:?usage: mint-client-cert.sh CONTROL_DATA_DIR OUT_DIR}
td=${TRUST_DOMAIN:-cluster.local}
mkdir -p "$out"
openssl ecparam -name prime256v1 -genkey -noout -out "$out/web.key"
openssl req -new -key "$out/web.key" -subj "/O=trellis-bench" -out "$out/web.csr" 2>/dev/null
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\nsubjectAltName=critical,URI:spiffe://%s/ns/bench/sa/web\n' "$td" >"$out/web.ext"
openssl x509 -req -in "$out/web.csr" -CA "$data/ca.pem" -CAkey "$data/ca-key.pem" -CAcreateserial \
  -CAserial "$out/ca.srl" -days 1 -sha256 -extfile "$out/web.ext" -out "$out/web.crt" 2>/dev/null
rm -f "$out/web.csr" "$out/web.ext" "$out/ca.srl"
