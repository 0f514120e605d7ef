#!/bin/sh
# Runs one step of an image build (deploy/Dockerfile: `pip install ...`, `gestalt weights fetch ...`) with the
# settings of the site the image is built at, none of which stays in the image. Bind-mounted into the RUN
# steps, never copied into the image. It reads:
#   /run/secrets/ca        an extra CA bundle (a TLS-intercepting proxy's CA), added to the system's bundle
#   /run/secrets/pip_conf  a pip.conf (an index URL that holds a password, find-links, constraints, ...)
#   /wheelhouse            a folder of wheels that `pip install` and `pip download` search first when it holds any
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_NO_INDEX  build arguments, read by pip itself
set -eu
# A build argument the build was not given arrives empty; pip would take an empty PIP_* as a value.
for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_NO_INDEX; do
  eval "value=\${$name-}"
  [ -n "$value" ] || unset "$name"
done
bundle=""
if [ -s /run/secrets/ca ]; then
  bundle=$(mktemp)
  cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca > "$bundle"
  export PIP_CERT="$bundle" SSL_CERT_FILE="$bundle" REQUESTS_CA_BUNDLE="$bundle"
fi
if [ -s /run/secrets/pip_conf ]; then
  export PIP_CONFIG_FILE=/run/secrets/pip_conf
fi
if [ "$#" -ge 2 ] && [ "$1" = pip ] && { [ "$2" = install ] || [ "$2" = download ]; } \
   && [ -n "$(ls -A /wheelhouse 2>/dev/null)" ]; then
  command=$2
  shift 2
  set -- pip "$command" --find-links /wheelhouse "$@"
fi
status=0
"$@" || status=$?
[ -z "$bundle" ] || rm -f "$bundle"
exit "$status"
