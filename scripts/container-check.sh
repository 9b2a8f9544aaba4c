#!/usr/bin/env bash
# Build the Dockerfile without a Docker daemon (podman) and run both levels of
# the demo inside the image as a cluster node would: read-only root, no
# network, two different users sharing one host /tmp (bind-mounted, as
# Apptainer does), no writable HOME. Reports start-up time, the first group
# run's time (shipped numba kernels) against a run that compiles them, the
# image size, and what an unwritable output folder gives. Where apptainer is
# installed it also builds the SIF from the image and runs both levels.
# Not part of the default test run.
#
#   sudo apt-get install podman runc debootstrap     # Debian packages
#   bash scripts/container-check.sh [WORK_DIR]
#   IMAGE=localhost/bidsglm:mine bash scripts/container-check.sh [WORK_DIR]   # check a built image
#
# No image registry is needed: when the pinned python base image is not in
# local storage, a Debian bookworm base with Python 3.11 is made with
# debootstrap and imported into podman (BASE_IMAGE build argument). Building
# needs the Debian mirror and the Python package index, as any pip install does.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/bidsglm-container-XXXXXX)}
BUILD=1
if [ -n "${IMAGE:-}" ]; then BUILD=0; else IMAGE=localhost/bidsglm:check; fi
BASE=localhost/bidsglm-base:bookworm
# vfs storage works without overlay support in the kernel; cgroupfs without systemd
# (runc: crun refuses hybrid cgroup hierarchies such as this sandbox's)
PODMAN=(podman --storage-driver=vfs --cgroup-manager=cgroupfs)
if command -v runc >/dev/null; then PODMAN+=(--runtime runc); fi
mkdir -p "$WORK"
echo "work folder: $WORK"

command -v podman >/dev/null || { echo "podman is not installed (apt-get install podman runc)"; exit 69; }

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

if [ "$BUILD" = 1 ]; then
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
    t0=$(now)
    vcs_ref=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    "${PODMAN[@]}" build --pull=never --isolation=chroot --network=host "${base_args[@]}" \
        --build-arg VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' bidsglm/__init__.py)" \
        --build-arg VCS_REF="$vcs_ref" \
        -t "$IMAGE" . > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
    echo "built in $(since "$t0") s"
fi
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
echo "image size: $((size / 1000000)) MB (target < 1000 MB)"
echo "revision label: $("${PODMAN[@]}" image inspect --format '{{index .Labels "org.opencontainers.image.revision"}}' "$IMAGE")"

# A host folder standing in for a cluster node's /tmp, shared by both users.
HOST_TMP="$WORK/node-tmp"
mkdir -p "$HOST_TMP" && chmod 1777 "$HOST_TMP"
# Explicit limits below the host's: podman otherwise raises them to the system
# maximum, which a sandbox without CAP_SYS_RESOURCE refuses ("error setting rlimit").
run=("${PODMAN[@]}" run --rm --read-only --network=none -v "$HOST_TMP:/tmp"
     --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

echo "== bidsglm --version, start-up time inside the container (target < 2 s)"
"${run[@]}" "$IMAGE" --version
"${run[@]}" --entrypoint python3 "$IMAGE" -c "
import subprocess, time
times = []
for _ in range(3):
    t = time.perf_counter(); subprocess.run(['bidsglm', '--version'], check=True, capture_output=True)
    times.append(time.perf_counter() - t)
print('bidsglm --version: ' + ', '.join(f'{t:.2f}' for t in times) + ' s')"

echo "== demo dataset"
mkdir -p "$WORK/demo"
chmod 777 "$WORK/demo"
# 8 subjects: more than ds000102's first six (their sex codes once failed validation), and
# 256 sign flips, so the permutation run is a real one; 6 mm keeps it quick
"${run[@]}" -v "$WORK/demo:/demo" --entrypoint bidsglm-demo "$IMAGE" /demo/data --subjects 8 --voxel-size 6

levels() {  # USER OUT [participant options]: both levels as USER (uid:gid), into OUT
    local user=$1 out=$2
    shift 2
    mkdir -p "$out" && chown "$user" "$out"
    "${run[@]}" --user "$user" -v "$WORK/demo/data:/data:ro" -v "$out:/out" "$IMAGE" /data /out participant \
        --n-cpus 2 --contrast "IncongruentMinusCongruent=incongruent_correct - congruent_correct" "$@"
    t0=$(now)
    "${run[@]}" --user "$user" -v "$WORK/demo/data:/data:ro" -v "$out:/out" "$IMAGE" /data /out group \
        --permutations 1000 --tfce --random-seed 1 --n-cpus 2
    echo "first group run as $user (all 256 sign flips, TFCE): $(since "$t0") s"
    for f in dataset_description.json group/report.html; do
        test -s "$out/$f" || { echo "missing: $out/$f"; exit 1; }
    done
}
echo "== user 1000 (the image's user): participant and group levels"
levels 1000:1000 "$WORK/out-1000"
test -s "$WORK/out-1000/sub-01.html" || { echo "missing: sub-01.html"; exit 1; }
echo "== user 2345, same node /tmp: participant and group levels"
levels 2345:2345 "$WORK/out-2345" --no-reports
ls -ld "$HOST_TMP"/bidsglm-* || true

echo "== the same group run compiling the kernels (no shipped cache, empty numba cache)"
t0=$(now)
"${run[@]}" --user 2345:2345 -e BIDSGLM_NUMBA_SHIPPED= -e NUMBA_CACHE_DIR=/tmp/compile-check-$$ \
    -v "$WORK/demo/data:/data:ro" -v "$WORK/out-2345:/out" "$IMAGE" /data /out group \
    --permutations 1000 --tfce --random-seed 1 --n-cpus 2 --no-reports 2>&1 | grep -E "permutations in|group level done"
echo "group run compiling the kernels: $(since "$t0") s"

echo "== provenance in dataset_description.json"
python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['GeneratedBy'][0])" "$WORK/out-1000/dataset_description.json"

echo "== an output folder the container user cannot write"
mkdir -p "$WORK/out-root" && chmod 755 "$WORK/out-root"
set +e
"${run[@]}" -v "$WORK/demo/data:/data:ro" -v "$WORK/out-root:/out" "$IMAGE" /data /out participant \
    --skip-bids-validation --participant-label 01 2>&1 | tail -2
echo "exit code: ${PIPESTATUS[0]}"
set -e

if command -v apptainer >/dev/null; then
    echo "== apptainer: SIF from the image (docker-archive), both levels"
    "${PODMAN[@]}" save --format docker-archive -o "$WORK/bidsglm.tar" "$IMAGE"
    apptainer build --force "$WORK/bidsglm.sif" "docker-archive://$WORK/bidsglm.tar"
    mkdir -p "$WORK/out-sif"
    apptainer run --cleanenv -B "$WORK/demo/data:/data:ro" -B "$WORK/out-sif:/out" "$WORK/bidsglm.sif" \
        /data /out participant --n-cpus 2 --contrast "IncongruentMinusCongruent=incongruent_correct - congruent_correct"
    apptainer run --cleanenv -B "$WORK/demo/data:/data:ro" -B "$WORK/out-sif:/out" "$WORK/bidsglm.sif" \
        /data /out group --permutations 200 --random-seed 1
else
    echo "== apptainer is not installed: SIF build skipped"
fi
n_maps=$(find "$WORK/out-1000" "$WORK/out-2345" -name '*_statmap.nii.gz' | wc -l)
echo "== passed: $n_maps maps and the reports in $WORK/out-1000 and $WORK/out-2345"
