#!/bin/sh
# A certificate authority for the contimg Dask cluster and one certificate, signed by it,
# for the scheduler, the workers and the clients (the stream, the app, notebooks).
#
#   deploy/make-certs.sh /etc/contimg/tls [HOST ...]
#
# writes ca.pem (give it to every machine), ca.key (keep it off the cluster: it signs new
# certificates), contimg.pem and contimg.key (every machine of the cluster; mode 600, owned
# by the service user). deploy/security.yaml points Dask at them. Hosts named on the
# command line are added to the certificate's subjectAltName (Dask does not check host
# names: what admits a peer is a certificate signed by this CA). Re-run to rotate.
set -eu
dir=${1:?usage: make-certs.sh DIR [HOST ...]}
shift
mkdir -p "$dir"
umask 077
san="DNS:localhost,IP:127.0.0.1"
for h in "$@"; do san="$san,DNS:$h"; done
days=${CONTIMG_CERT_DAYS:-825}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=contimg cluster CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=contimg" \
    -keyout "$dir/contimg.key" -out "$dir/contimg.csr" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$dir/ext.cnf"
openssl x509 -req -in "$dir/contimg.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days "$days" -out "$dir/contimg.pem" -extfile "$dir/ext.cnf" 2>/dev/null
rm -f "$dir/contimg.csr" "$dir/ext.cnf" "$dir/ca.srl"
chmod 644 "$dir/ca.pem" "$dir/contimg.pem"
echo "certificates in $dir: ca.pem, contimg.pem, contimg.key (ca.key: keep it safe)"
