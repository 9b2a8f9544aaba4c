#!/usr/bin/env bash
# Build the Dockerfile without a Docker daemon (podman) and run both levels of
# the demo inside the image with a read-only root filesystem, as a non-root
# user with no writable HOME. Not part of the default test run.
#
#   sudo apt-get install podman runc debootstrap     # Debian packages
#   bash scripts/container-check.sh [WORK_DIR]
#
# No image registry is needed: when the pinned python base image is not in
# local storage, a Debian bookworm base with Python 3.11 is made with
# debootstrap and imported into podman (BASE_IMAGE build argument). Building
# needs the Debian mirror and the Python package index, as any pip install does.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/bidsglm-container-XXXXXX)}
IMAGE=localhost/bidsglm:check
BASE=localhost/bidsglm-base:bookworm
# vfs storage works without overlay support in the kernel; cgroupfs without systemd
# (runc: crun refuses hybrid cgroup hierarchies such as this sandbox's)
PODMAN=(podman --storage-driver=vfs --cgroup-manager=cgroupfs)
if command -v runc >/dev/null; then PODMAN+=(--runtime runc); fi
mkdir -p "$WORK"
echo "work folder: $WORK"

command -v podman >/dev/null || { echo "podman is not installed (apt-get install podman runc)"; exit 69; }

base_args=()
if ! "${PODMAN[@]}" image exists python:3.11.11-slim-bookworm 2>/dev/null; then
    if ! "${PODMAN[@]}" image exists "$BASE"; then
        command -v debootstrap >/dev/null || { echo "debootstrap is not installed"; exit 69; }
        echo "== making a local Debian bookworm base image with Python 3.11 (debootstrap)"
        rootfs="$WORK/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
            bookworm "$rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log"
        # the host's certificate bundle, for pip behind the same TLS set-up as the host
        cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
        rm -rf "$rootfs/var/cache/apt/archives"/*.deb
        tar -C "$rootfs" -c . | "${PODMAN[@]}" import --change 'CMD ["python3"]' - "$BASE"
        rm -rf "$rootfs"
    fi
    base_args=(--build-arg "BASE_IMAGE=$BASE")
fi

echo "== building $IMAGE"
"${PODMAN[@]}" build --pull=never --isolation=chroot --network=host "${base_args[@]}" \
    --build-arg VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' bidsglm/__init__.py)" \
    -t "$IMAGE" . > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }

# Explicit limits below the host's: podman otherwise raises them to the system
# maximum, which a sandbox without CAP_SYS_RESOURCE refuses ("error setting rlimit").
run=("${PODMAN[@]}" run --rm --read-only --tmpfs /tmp --network=none
     --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
echo "== bidsglm --version"
"${run[@]}" "$IMAGE" --version

echo "== demo dataset, participant and group levels (read-only root, uid 1000, no network)"
mkdir -p "$WORK/demo/out"
chmod 777 "$WORK/demo" "$WORK/demo/out"
"${run[@]}" -v "$WORK/demo:/demo" --entrypoint bidsglm-demo "$IMAGE" /demo/data --subjects 3
"${run[@]}" -v "$WORK/demo/data:/data:ro" -v "$WORK/demo/out:/out" "$IMAGE" /data /out participant \
    --n-cpus 2 --contrast "IncongruentMinusCongruent=incongruent_correct - congruent_correct"
"${run[@]}" -v "$WORK/demo/data:/data:ro" -v "$WORK/demo/out:/out" "$IMAGE" /data /out group \
    --permutations 50 --random-seed 1

for f in "$WORK/demo/out/dataset_description.json" "$WORK/demo/out/sub-01.html" "$WORK/demo/out/group/report.html"; do
    test -s "$f" || { echo "missing: $f"; exit 1; }
done
n_maps=$(find "$WORK/demo/out" -name '*_statmap.nii.gz' | wc -l)
echo "== passed: $n_maps maps and the reports in $WORK/demo/out"
