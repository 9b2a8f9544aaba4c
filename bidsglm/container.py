"""What the container image tells about itself, for provenance and messages.

The image sets ``BIDSGLM_CONTAINER_IMAGE`` (its published name and tag) and
``BIDSGLM_VCS_REF`` (the revision it was built from). An image cannot know its
own digest (the digest is computed from its content), so a platform that knows
it passes ``BIDSGLM_CONTAINER_DIGEST`` (``docker run -e ...``); it is then
recorded too. Outside the image none of these are set and nothing is recorded.
"""

from __future__ import annotations

import os


def _runtime() -> str:
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        return "singularity"  # the BIDS name for Apptainer/Singularity images
    return "docker"


def in_container() -> bool:
    return bool(os.environ.get("BIDSGLM_CONTAINER_IMAGE"))


def generated_by_container() -> dict:
    """``{"Container": {...}}`` for dataset_description.json's GeneratedBy entry
    (BIDS: Type, Tag, URI), or ``{}`` outside the image."""
    image = os.environ.get("BIDSGLM_CONTAINER_IMAGE", "").strip()
    if not image:
        return {}
    container = {"Type": _runtime(), "Tag": image}
    digest = os.environ.get("BIDSGLM_CONTAINER_DIGEST", "").strip()
    if digest:
        name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
        container["URI"] = f"docker://{name}@{digest}"
    return {"Container": container}


def permission_hint() -> str:
    """Advice appended to 'OUTPUT_DIR is not writable' inside the image."""
    if not in_container():
        return ""
    if _runtime() == "docker":
        return ("; the container runs as uid 1000 by default: pass --user $(id -u):$(id -g) to "
                "docker run, or choose a folder that user can write")
    return "; choose a folder your user can write and bind it into the container"
