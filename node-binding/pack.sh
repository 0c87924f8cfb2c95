#!/usr/bin/env bash
# Makes the npm packages, ready for `npm publish`, in one command:
#
#   bash node-binding/pack.sh DIR
#
# DIR/sticky-cluster-native-<version>.tgz: the main package (JS, types, and the vendored Rust sources for the
# build-from-source fallback; `optionalDependencies` names each platform package at exactly <version>).
# DIR/sticky-cluster-native-<platform>-<version>.tgz per platform (default linux-x64-gnu): the addon only,
# built once with cargo-zigbuild against glibc $GLIBC_FLOOR, and refused when `objdump -T` shows a
# GLIBC_ symbol version above the floor or a strong undefined symbol that is neither libc's nor Node's.
# `bash pack.sh --check-glibc FILE` runs only that check. Environment: PLATFORMS (space-separated npm/<platform> folders, default linux-x64-gnu), GLIBC_FLOOR
# (default 2.17), CARGO_TARGET_DIR. Needs cargo, `pip install ziglang cargo-zigbuild`, objdump (binutils).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
platforms="${PLATFORMS:-linux-x64-gnu}"
floor="${GLIBC_FLOOR:-2.17}"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"

die() {
    echo "pack.sh: $*" >&2
    exit 1
}

# rust_target PLATFORM: the cargo-zigbuild --target for an npm platform folder name.
rust_target() {
    case "$1" in
    linux-x64-gnu) echo "x86_64-unknown-linux-gnu.$floor" ;;
    linux-arm64-gnu) echo "aarch64-unknown-linux-gnu.$floor" ;;
    linux-x64-musl) echo "x86_64-unknown-linux-musl" ;;
    linux-arm64-musl) echo "aarch64-unknown-linux-musl" ;;
    *) die "no Rust target known for platform '$1' (add it to rust_target in pack.sh)" ;;
    esac
}

# check_glibc_floor FILE: no GLIBC_ version above $floor, no strong undefined symbol without a version
# except Node's own napi_*/node_api_* (a libc function the floor lacks would link as exactly that).
check_glibc_floor() {
    local symbols highest unversioned
    symbols="$(objdump -T "$1")" || die "objdump -T $1 failed"
    highest="$(grep -o 'GLIBC_[0-9][0-9.]*' <<<"$symbols" | sed 's/GLIBC_//' | sort -uV | tail -1)"
    [ -n "$highest" ] || die "$1 names no GLIBC_ symbol version: not a glibc build?"
    if [ "$(printf '%s\n%s\n' "$highest" "$floor" | sort -V | tail -1)" != "$floor" ]; then
        die "$1 needs GLIBC_$highest, above the floor $floor, for" \
            "$(grep "(GLIBC_$highest)" <<<"$symbols" | awk '{print $NF}' | sort -u | paste -sd, -)"
    fi
    unversioned="$(awk '$2 != "w" && /\*UND\*/ && $NF !~ /^(napi_|node_api_)/ && $0 !~ /\(GLIBC_/' <<<"$symbols")"
    [ -z "$unversioned" ] ||
        die "$1 has undefined symbols that glibc $floor does not provide: $(awk '{print $NF}' <<<"$unversioned" | paste -sd, -)"
    echo "pack.sh: $(basename "$1") needs glibc $highest at most (floor $floor)" >&2
}

# `bash pack.sh --check-glibc FILE`: only the floor check, for the tests and for release checklists.
if [ "${1:-}" = "--check-glibc" ] && [ $# -eq 2 ]; then
    command -v objdump >/dev/null || die "objdump not found: apt-get install binutils"
    check_glibc_floor "$2"
    exit 0
fi

[ $# -eq 1 ] || die "usage: bash node-binding/pack.sh DIR (the folder the .tgz files go to)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"
command -v cargo-zigbuild >/dev/null || die "cargo-zigbuild not found: pip install ziglang cargo-zigbuild"
command -v objdump >/dev/null || die "objdump not found: apt-get install binutils"

version="$(node -p "require('$here/package.json').version")"
stage="$(mktemp -d /tmp/sticky-native-pack.XXXXXX)"
trap 'rm -rf "$stage"' EXIT

main_manifest="$here/package.json"
for platform in $platforms; do
    template="$here/npm/$platform"
    [ -f "$template/package.json" ] || die "no package template $template/package.json"
    name="$(node -p "require('$template/package.json').name")"
    listed="$(node -p "(require('$main_manifest').optionalDependencies || {})['$name'] || ''")"
    [ "$listed" = "$version" ] ||
        die "$main_manifest: optionalDependencies must list $name at exactly $version (found '${listed:-nothing}')"

    target="$(rust_target "$platform")"
    triple="${target%%.*}"
    if [[ "$triple" == *-musl ]]; then
        # An addon must use the musl that Node loaded, not carry a second, static one.
        triple_env="$(tr 'a-z-' 'A-Z_' <<<"$triple")"
        export "CARGO_TARGET_${triple_env}_RUSTFLAGS=-C target-feature=-crt-static"
    fi
    echo "pack.sh: cargo zigbuild --release -p sticky-cluster-node --target $target" >&2
    (cd "$repo" && cargo zigbuild --release -p sticky-cluster-node --target "$target" --target-dir "$target_dir")
    library="$target_dir/$triple/release/libsticky_cluster_node.so"
    [ -f "$library" ] || die "cargo-zigbuild finished but $library is missing"
    case "$platform" in *-gnu) check_glibc_floor "$library" ;; esac

    # The platform package: the template with the main package's version, and the addon under napi's name.
    package="$stage/$platform"
    mkdir -p "$package"
    cp "$template/package.json" "$template/README.md" "$package/"
    node -e "
        const fs = require('fs');
        const file = '$package/package.json';
        const manifest = JSON.parse(fs.readFileSync(file, 'utf8'));
        manifest.version = '$version';
        fs.writeFileSync(file, JSON.stringify(manifest, null, 2) + '\n');
    "
    addon="$(node -p "require('$package/package.json').main")"
    cp "$library" "$package/$addon"
    (cd "$package" && npm pack --pack-destination "$out" --loglevel=error >/dev/null)
    echo "$out/$name-$version.tgz"
done

# The main package: prepack vendors the Rust sources, postpack removes them again.
(cd "$here" && npm pack --pack-destination "$out" --loglevel=error >/dev/null)
echo "$out/sticky-cluster-native-$version.tgz"
