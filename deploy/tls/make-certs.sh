#!/usr/bin/env bash
# Makes a cluster CA and certificates for Roster's TLS with openssl.
#
#   deploy/tls/make-certs.sh DIR node-ID=HOST[,HOST...] [node-ID=HOST[,HOST...] ...]
#
# For each node-ID, ID being the Roster node id (--id) of the node that uses
# it: DIR/node-ID.crt and DIR/node-ID.key, valid for the HOSTs (DNS names or
# IP addresses: every name the node is dialled by, client and peer), usable
# as server and as client certificate (the node presents it to its peers),
# and naming the node (URI SAN urn:roster:node:ID): the peer port admits
# only a member's certificate, sending as that member. Also DIR/client.crt
# and DIR/client.key, a client-only certificate naming no node, for the CLI
# or an application when the client port asks for one (the peer port
# refuses it). DIR/ca.crt and DIR/ca.key are made once and reused by later
# runs, so more certificates can be issued by the same CA; keep ca.key off
# the nodes.
#
# Example, a 3-node cluster:
#   deploy/tls/make-certs.sh certs node-1=roster-1,roster-1.example.internal \
#     node-2=roster-2,roster-2.example.internal node-3=roster-3,roster-3.example.internal
#   roster server ... --tls-cert certs/node-1.crt --tls-key certs/node-1.key --tls-ca certs/ca.crt
#   roster status --endpoints roster-1:7001 --cacert certs/ca.crt
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
dir=$1
shift
# node-ID: the id is what the peer port checks, so a spec without one is refused.
for spec in "$@"; do
  if ! [[ $spec =~ ^node-[1-9][0-9]*=[^=]+$ ]]; then
    echo "expected node-ID=HOST[,HOST...], ID the Roster node id (1, 2, ...) of the node using it; got $spec" >&2
    exit 2
  fi
done
days=${ROSTER_CERT_DAYS:-825}
mkdir -p "$dir"
umask 077

if [ ! -f "$dir/ca.key" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days "$days" \
    -subj "/CN=Roster cluster CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  echo "made $dir/ca.crt (and ca.key: keep it off the nodes)"
fi

# issue NAME SAN_LIST EXTENDED_KEY_USAGE
issue() {
  local name=$1 sans=$2 usage=$3 ext
  ext=$(mktemp)
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [ -n "$sans" ] && echo "subjectAltName=$sans"
  } >"$ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=$name" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -out "$dir/$name.crt" -days "$days" -extfile "$ext" 2>/dev/null
  rm -f "$dir/$name.csr" "$ext"
  echo "made $dir/$name.crt for ${sans:-no host}"
}

for spec in "$@"; do
  name=${spec%%=*}
  hosts=${spec#*=}
  sans="URI:urn:roster:node:${name#node-}"
  IFS=, read -ra list <<<"$hosts"
  for h in "${list[@]}"; do
    if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then
      sans+="${sans:+,}IP:$h"
    else
      sans+="${sans:+,}DNS:$h"
    fi
  done
  issue "$name" "$sans" "serverAuth,clientAuth"
done
issue client "" clientAuth
chmod 644 "$dir"/*.crt
