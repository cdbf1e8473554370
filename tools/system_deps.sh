#!/bin/sh
# Install the Debian/Ubuntu packages in $PACKAGES that are missing: as root with apt-get, otherwise print the
# exact command and fail (so `make demo` / `make test` never half-work without them).
set -eu
missing=""
for pkg in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages:$missing"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
    exit 0
fi
echo "missing system packages:$missing" >&2
echo "install them with: sudo apt-get install -y$missing" >&2
exit 1
