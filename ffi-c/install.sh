#!/usr/bin/env bash
# Builds and installs the C library: libsticky_cluster.so (with its versioned names) and .a into
# $LIBDIR, sticky_cluster.h into $INCLUDEDIR, and sticky_cluster.pc into $LIBDIR/pkgconfig.
#
#   PREFIX=/usr/local bash ffi-c/install.sh
#
# Environment: PREFIX (default /usr/local), LIBDIR (default $PREFIX/lib), INCLUDEDIR (default
# $PREFIX/include), PROFILE (release, the default, or debug), CARGO_TARGET_DIR, DESTDIR (staging root
# for packagers: files go under $DESTDIR$PREFIX while the .pc file names $PREFIX).
# Then:  cc app.c $(pkg-config --cflags --libs sticky_cluster)
# (with PKG_CONFIG_PATH=$LIBDIR/pkgconfig when that is not on pkg-config's default path).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
prefix="${PREFIX:-/usr/local}"
libdir="${LIBDIR:-$prefix/lib}"
includedir="${INCLUDEDIR:-$prefix/include}"
profile="${PROFILE:-release}"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
destdir="${DESTDIR:-}"

case "$profile" in
release) profile_flag=(--release) ;;
debug) profile_flag=() ;;
*) echo "error: PROFILE must be release or debug, got '$profile'" >&2; exit 2 ;;
esac
# `cargo rustc` rather than `cargo build` so that rustc prints the system libraries the static library
# needs (native-static-libs) for this toolchain and target; cargo replays the note when nothing changed.
build_log="$(mktemp)"
trap 'rm -f "$build_log"' EXIT
cargo rustc --manifest-path "$repo/Cargo.toml" "${profile_flag[@]}" -p sticky-cluster-ffi --lib \
    -- --print native-static-libs 2>&1 | tee "$build_log"
libs_private="$(sed -n 's/^note: native-static-libs: //p' "$build_log" | tail -1)"
if [ -z "$libs_private" ]; then
    echo "error: rustc printed no 'native-static-libs' line for libsticky_cluster.a" >&2
    exit 1
fi

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)"
major="${version%%.*}"
minor="${version#*.}"; minor="${minor%%.*}"
if [ "$major" = 0 ]; then abi="0.$minor"; else abi="$major"; fi
built="$target_dir/$profile"

install -d "$destdir$libdir/pkgconfig" "$destdir$includedir"
install -m 0755 "$built/libsticky_cluster.so" "$destdir$libdir/libsticky_cluster.so.$version"
ln -sfn "libsticky_cluster.so.$version" "$destdir$libdir/libsticky_cluster.so.$abi"
ln -sfn "libsticky_cluster.so.$abi" "$destdir$libdir/libsticky_cluster.so"
install -m 0644 "$built/libsticky_cluster.a" "$destdir$libdir/libsticky_cluster.a"
install -m 0644 "$here/include/sticky_cluster.h" "$destdir$includedir/sticky_cluster.h"

# Libs.private: what the Rust static library needs, as rustc said above, for `pkg-config --static`.
cat > "$destdir$libdir/pkgconfig/sticky_cluster.pc" <<PC
prefix=$prefix
libdir=$libdir
includedir=$includedir

Name: sticky_cluster
Description: Sticky-session connection router: run a cluster and receive sticky-routed sockets in C
Version: $version
Libs: -L\${libdir} -lsticky_cluster
Libs.private: $libs_private
Cflags: -I\${includedir}
PC

echo "installed sticky_cluster $version ($profile) into ${destdir}$prefix:"
echo "  $libdir/libsticky_cluster.so.$version (+ .so.$abi, .so), libsticky_cluster.a"
echo "  $includedir/sticky_cluster.h, $libdir/pkgconfig/sticky_cluster.pc (Libs.private: $libs_private)"
