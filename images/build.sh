#!/usr/bin/env bash
# Builds DeltaBox's test images reproducibly from Debian's package mirror only (the machine's apt sources),
# as OCI image layouts:
#   OUTDIR/debian/    Debian bookworm (minbase + the tools agents use), one gzip layer
#   OUTDIR/busybox/   busybox-static + applet symlinks, /etc/passwd, /etc/group, /tmp
# Usage: images/build.sh [OUTDIR]            (default: .images/ in the repository; run as root)
# An image is rebuilt only when its recipe (this script + its inputs) changed: OUTDIR/NAME.recipe holds the hash.
# See docs/images.md for sizes and build times.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
outdir=${1:-"$script_dir/../.images"}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)

# Every timestamp in the images (config "created", clamped file mtimes). Changing it changes the recipe.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1735689600}   # 2025-01-01T00:00:00Z
suite=bookworm
debian_packages=bash,coreutils,python3,python3-venv,git,procps,sqlite3,make,gcc,libc6-dev,tar,xz-utils,ca-certificates,iproute2,python3-ipykernel,python3-jupyter-client,postgresql,python3-psycopg2,redis-server,python3-redis
path_env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

if [ "$(id -u)" != 0 ]; then
    echo "images/build.sh: run as root (mmdebstrap needs it to create device nodes and set owners)" >&2
    exit 1
fi

need_packages=()
command -v mmdebstrap >/dev/null || need_packages+=(mmdebstrap)
[ -x /bin/busybox ] && /bin/busybox --list-full >/dev/null 2>&1 && dpkg -s busybox-static >/dev/null 2>&1 \
    || need_packages+=(busybox-static)
if [ ${#need_packages[@]} -gt 0 ]; then
    echo "installing ${need_packages[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_packages[@]}" >&2 || {
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_packages[@]}" >&2
    }
fi

# The Debian sources of this machine, without third-party repositories.
debian_sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && grep -q '^[^#]*debian' "$f" && debian_sources+=("$f")
done

sha256() { sha256sum "$1" | cut -d' ' -f1; }

# deterministic_tar DIR: a tar of DIR on stdout: sorted names, numeric owners, mtimes clamped to
# SOURCE_DATE_EPOCH, no atime/ctime, xattrs (security.capability) kept.
deterministic_tar() {
    tar --create --file=- --directory="$1" --sort=name --numeric-owner --format=posix \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
        --mtime="@$SOURCE_DATE_EPOCH" --clamp-mtime --xattrs --xattrs-include='*' .
}

# write_oci_layout ROOTFS OUT CONFIG_JSON_BODY: writes an OCI image layout with ROOTFS as its one gzip layer.
# CONFIG_JSON_BODY is the "config" object of the image config (Env, Cmd, ...).
write_oci_layout() {
    local rootfs=$1 out=$2 config_body=$3
    mkdir -p "$out/blobs/sha256"
    deterministic_tar "$rootfs" >"$out/layer.tar"
    local diff_id; diff_id=$(sha256 "$out/layer.tar")
    gzip -n -6 <"$out/layer.tar" >"$out/layer.tar.gz"
    rm "$out/layer.tar"
    local layer_digest layer_size
    layer_digest=$(sha256 "$out/layer.tar.gz"); layer_size=$(stat -c %s "$out/layer.tar.gz")
    mv "$out/layer.tar.gz" "$out/blobs/sha256/$layer_digest"

    local created; created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
    printf '{"architecture":"amd64","os":"linux","created":"%s","config":%s,"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"%s","created_by":"images/build.sh"}]}' \
        "$created" "$config_body" "$diff_id" "$created" >"$out/config.json"
    local config_digest config_size
    config_digest=$(sha256 "$out/config.json"); config_size=$(stat -c %s "$out/config.json")
    mv "$out/config.json" "$out/blobs/sha256/$config_digest"

    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
        "$config_digest" "$config_size" "$layer_digest" "$layer_size" >"$out/manifest.json"
    local manifest_digest manifest_size
    manifest_digest=$(sha256 "$out/manifest.json"); manifest_size=$(stat -c %s "$out/manifest.json")
    mv "$out/manifest.json" "$out/blobs/sha256/$manifest_digest"

    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}' \
        "$manifest_digest" "$manifest_size" >"$out/index.json"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$out/oci-layout"
}

# The recipe hash of image NAME: this script, the build date, the arguments that select packages, and the
# version of the package the image copies from the host (busybox-static).
recipe_hash() {
    {
        cat "${BASH_SOURCE[0]}"
        echo "$1 $SOURCE_DATE_EPOCH $suite $debian_packages"
        case $1 in
            busybox) dpkg-query -W -f '${Version}\n' busybox-static ;;
            debian) cat "${debian_sources[@]}" ;;
        esac
    } | sha256sum | cut -d' ' -f1
}

build_debian() {
    local work=$1
    # minbase + the listed packages; no docs/man pages (they are half the size and no test reads them).
    mmdebstrap --variant=minbase --mode=root --include="$debian_packages" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        "$suite" "$work/rootfs" "${debian_sources[@]}" >&2
    write_oci_layout "$work/rootfs" "$work/image" "{\"Env\":[\"$path_env\",\"LANG=C.UTF-8\"],\"Cmd\":[\"/bin/bash\"],\"WorkingDir\":\"/root\"}"
}

build_busybox() {
    local work=$1 root=$1/rootfs
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev}
    chmod 1777 "$root/tmp"
    chmod 0700 "$root/root"
    install -m 0755 /bin/busybox "$root/bin/busybox"
    local applet
    for applet in $(/bin/busybox --list-full); do
        [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$root/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    write_oci_layout "$root" "$work/image" "{\"Env\":[\"$path_env\"],\"Cmd\":[\"/bin/sh\"]}"
}

for name in busybox debian; do
    hash=$(recipe_hash "$name")
    if [ -f "$outdir/$name/index.json" ] && [ "$(cat "$outdir/$name.recipe" 2>/dev/null)" = "$hash" ]; then
        echo "$name: up to date" >&2
        continue
    fi
    echo "$name: building" >&2
    start=$(date +%s)
    work=$(mktemp -d "$outdir/.build-$name.XXXXXX")
    "build_$name" "$work"
    rm -rf "$outdir/$name" "$outdir/$name.recipe"
    mv "$work/image" "$outdir/$name"
    echo "$hash" >"$outdir/$name.recipe"
    rm -rf "$work"
    echo "$name: built in $(( $(date +%s) - start ))s, $(du -sh "$outdir/$name" | cut -f1)" >&2
done

for name in busybox debian; do
    echo "$name: $outdir/$name"
done
