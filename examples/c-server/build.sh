#!/usr/bin/env bash
# Builds c-server against the installed library through its pkg-config file.
#   bash examples/c-server/build.sh [OUTPUT]      (default: examples/c-server/c-server)
# Environment: CC (default cc), CFLAGS (default -O2), PKG_CONFIG_PATH when installed outside the
# default search path, e.g. PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
output="${1:-$here/c-server}"
# shellcheck disable=SC2046  # pkg-config prints several flags on purpose
"${CC:-cc}" ${CFLAGS:--O2} -std=c11 -Wall -Wextra -Werror -o "$output" "$here/main.c" \
    $(pkg-config --cflags --libs sticky_cluster)
echo "built $output"
