#!/usr/bin/env bash
# Makes a throwaway ECDSA P-256 CA and two SPIFFE-style workload certificates
# (client "web", server "api") for the nginx and HAProxy peer pairs. Usage: gen-certs.sh DIR
# Same kind as the SVIDs Trellis issues: P-256 leaf, CA:FALSE, digitalSignature, EKU
# serverAuth+clientAuth, a SPIFFE URI SAN; plus a DNS SAN, because nginx and HAProxy can
# only check a DNS name (proxy_ssl_name / verifyhost), not a URI SAN.
# (Copied from shared/peers/gen-certs.sh.)
set -euo pipefail
dir=${1:?usage: gen-certs.sh DIR}
mkdir -p "$dir" && cd "$dir"
[ -f ca.crt ] && exit 0
td=${TRUST_DOMAIN:-cluster.local}
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/O=peer-bench CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt 2>/dev/null
for w in web api; do
  openssl ecparam -name prime256v1 -genkey -noout -out $w.key
  openssl req -new -key $w.key -subj "/O=peer-bench" -out $w.csr 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=URI:spiffe://%s/ns/default/sa/%s,DNS:%s.default.svc\n' "$td" $w $w > $w.ext
  openssl x509 -req -in $w.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -sha256 -extfile $w.ext -out $w.crt 2>/dev/null
done
rm -f ./*.csr ./*.ext ca.srl
