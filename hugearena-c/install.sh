#!/usr/bin/env bash
# Builds and installs the C library: libhugearena.so (soname
# libhugearena.so.0), libhugearena.a, hugearena.h and hugearena.pc.
#
#   hugearena-c/install.sh [--prefix DIR]      (default /usr/local)
#
# Then: cc prog.c $(pkg-config --cflags --libs hugearena)
# (with PKG_CONFIG_PATH=DIR/lib/pkgconfig for a prefix pkg-config does not
# search, and DIR/lib in the run-time search path: ldconfig, -Wl,-rpath or
# LD_LIBRARY_PATH). CARGO_TARGET_DIR chooses where cargo builds.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix=/usr/local
while (($#)); do
    case $1 in
        --prefix) prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)
target=${CARGO_TARGET_DIR:-$here/../target}

cargo build --release --manifest-path "$here/Cargo.toml" --lib
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/Cargo.toml" | head -n1)
# What a static link needs besides the archive, as rustc reports it.
private_libs=$(cargo rustc --release --quiet --manifest-path "$here/Cargo.toml" --lib \
    --crate-type staticlib -- --print native-static-libs 2>&1 |
    sed -n 's/.*native-static-libs: //p' | tail -n1)

install -d "$prefix/include" "$prefix/lib/pkgconfig"
install -m 0644 "$here/include/hugearena.h" "$prefix/include/hugearena.h"
install -m 0755 "$target/release/libhugearena_c.so" "$prefix/lib/libhugearena.so.$version"
ln -sf "libhugearena.so.$version" "$prefix/lib/libhugearena.so.0"
ln -sf libhugearena.so.0 "$prefix/lib/libhugearena.so"
install -m 0644 "$target/release/libhugearena_c.a" "$prefix/lib/libhugearena.a"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" -e "s|@PRIVATE_LIBS@|$private_libs|" \
    "$here/hugearena.pc.in" > "$prefix/lib/pkgconfig/hugearena.pc"
if [ "$(id -u)" = 0 ] && [ "$prefix" = /usr/local ] && command -v ldconfig >/dev/null; then
    ldconfig
fi
echo "installed hugearena $version in $prefix (lib, include, lib/pkgconfig/hugearena.pc)"
