"""A small simulated fMRIPrep-style dataset with known activations.

Real flanker timing (OpenNeuro ds000102, shipped in ``data/demo/events``)
drives simulated BOLD on an MNI152 grid (nilearn's bundled brain mask,
resampled; nothing is downloaded). Two blobs respond:

- ``visual`` (occipital, MNI 0,-88,4): every condition, ``amplitude`` % peak;
- ``acc`` (dorsal anterior cingulate, MNI 0,20,40): incongruent trials only.

So ``congruent_correct`` is true in ``visual``, ``incongruent_correct`` in both,
and ``incongruent_correct - congruent_correct`` in ``acc`` only. Noise is AR(1)
in time (rho 0.3) and Gaussian-smoothed in space; motion confounds are random
walks unrelated to the signal. ``make_demo`` returns the truth masks so tests
can score detections.

Command line: ``bidsglm-demo DIR [--subjects N] [--voxel-size MM] [--seed S] [--surface cifti|gifti]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from .errors import EX_CANTCREAT, EX_INTERRUPTED, EX_SOFTWARE, EX_USAGE
from .interrupts import install_signal_handlers, restore_signal_handlers

TASK = "flanker"
TR = 2.0
N_VOLUMES = 146  # ds000102 runs: 146 volumes of 2 s
SPACE = "MNI152NLin2009cAsym"
BLOBS = {"visual": (0.0, -88.0, 4.0), "acc": (0.0, 20.0, 40.0)}
BLOB_RADIUS_MM = 10.0
RESPONDS = {  # which blob responds to which condition prefix
    "visual": ("congruent", "incongruent"),
    "acc": ("incongruent",),
}


@dataclass
class DemoTruth:
    affine: np.ndarray
    brain: np.ndarray  # bool (X, Y, Z)
    blobs: dict  # name -> bool (X, Y, Z)
    amplitude: float

    def null_region(self, margin_mm: float = 12.0) -> np.ndarray:
        """Brain voxels far (blob radius + margin) from every blob centre."""
        far = self.brain.copy()
        coords = _world_coords(self.brain.shape, self.affine)
        for centre in BLOBS.values():
            dist = np.linalg.norm(coords - np.array(centre), axis=-1)
            far &= dist > BLOB_RADIUS_MM + margin_mm
        return far


def _events_dir():
    return resources.files("bidsglm") / "data" / "demo" / "events"


def _world_coords(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def demo_grid(voxel_size: float):
    """Brain mask on an MNI grid, cropped to the brain plus a 2-voxel margin."""
    from nilearn.datasets import load_mni152_brain_mask

    mask_img = load_mni152_brain_mask(resolution=int(voxel_size), threshold=0.2)
    mask = np.asanyarray(mask_img.dataobj) > 0
    idx = np.nonzero(mask)
    lo = [max(int(i.min()) - 2, 0) for i in idx]
    hi = [min(int(i.max()) + 3, n) for i, n in zip(idx, mask.shape)]
    mask = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    affine = mask_img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array(lo)
    return mask, affine


# the values BIDS allows in participants.tsv's sex column (the schema's levels)
BIDS_SEX = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O"}


def bids_sex(value) -> str:
    """A source dataset's sex/gender code as a BIDS value; codes BIDS does not define
    (ds000102 has 'D' for two participants) become n/a rather than a validation error."""
    return BIDS_SEX.get(str(value).strip().lower(), "n/a")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype=np.float32, slope=None, tr=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        img.header.set_zooms(img.header.get_zooms()[:3] + (tr,))
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    nib.save(img, str(path))


def _confounds(rng, n: int, outliers: bool) -> pd.DataFrame:
    """fMRIPrep-like confounds: motion random walks, derivatives with n/a first row, FD."""
    table = {}
    for name, scale in [("trans_x", 0.02), ("trans_y", 0.02), ("trans_z", 0.03),
                        ("rot_x", 3e-4), ("rot_y", 3e-4), ("rot_z", 3e-4)]:
        walk = np.cumsum(rng.normal(0, scale, n))
        deriv = np.r_[np.nan, np.diff(walk)]
        table[name] = walk
        table[f"{name}_derivative1"] = deriv
        table[f"{name}_power2"] = walk**2
        table[f"{name}_derivative1_power2"] = deriv**2
    trans = np.abs(np.diff(np.column_stack([table[f"trans_{a}"] for a in "xyz"]), axis=0)).sum(1)
    rot = np.abs(np.diff(np.column_stack([table[f"rot_{a}"] for a in "xyz"]), axis=0)).sum(1)
    table["framewise_displacement"] = np.r_[np.nan, trans + 50 * rot]
    for name in ("global_signal", "csf", "white_matter"):
        table[name] = 800 + np.cumsum(rng.normal(0, 0.5, n))
    for i in range(6):
        table[f"a_comp_cor_{i:02d}"] = rng.normal(0, 1, n) / np.sqrt(n)
    if outliers:
        spike = np.zeros(n)
        spike[int(rng.integers(10, n - 10))] = 1
        table["motion_outlier00"] = spike
    return pd.DataFrame(table)


def _condition_regressors(events: pd.DataFrame, n: int) -> pd.DataFrame:
    from nilearn.glm.first_level import make_first_level_design_matrix

    frame_times = np.arange(n) * TR
    dm = make_first_level_design_matrix(frame_times, events, hrf_model="glover", drift_model=None)
    return dm.drop(columns=["constant"])


def _simulate_run(rng, brain, affine, blobs, events, amplitude, noise_pct) -> np.ndarray:
    shape = brain.shape
    regs = _condition_regressors(events, N_VOLUMES)
    signal = np.zeros(shape + (N_VOLUMES,), dtype=np.float32)
    for blob, prefixes in RESPONDS.items():
        course = np.zeros(N_VOLUMES)
        for col in regs.columns:
            if col.split("_")[0] in prefixes:
                course += regs[col].to_numpy() / regs[col].max()
        signal[blobs[blob]] += (amplitude / 100.0 * course).astype(np.float32)
    baseline = np.where(brain, 800.0, 80.0).astype(np.float32)
    baseline = gaussian_filter(baseline, 1.0)
    noise = rng.standard_normal(shape + (N_VOLUMES,), dtype=np.float32)
    for t in range(N_VOLUMES):  # spatial smoothness, unit variance kept
        noise[..., t] = gaussian_filter(noise[..., t], 1.0) * 2.0
    for t in range(1, N_VOLUMES):  # AR(1) in time, rho 0.3
        noise[..., t] = 0.3 * noise[..., t - 1] + np.sqrt(1 - 0.09) * noise[..., t]
    drift = np.cos(np.pi * np.arange(N_VOLUMES) / N_VOLUMES).astype(np.float32) * 0.005
    bold = baseline[..., None] * (1 + signal + drift + noise * (noise_pct / 100.0))
    return bold


def make_demo(root: Path, n_subjects: int = 4, voxel_size: float = 4.0, amplitude: float = 2.0,
              noise_pct: float = 1.0, seed: int = 42) -> DemoTruth:
    """Write the raw BIDS dataset with ``derivatives/fmriprep`` under ``root``."""
    root = Path(root)
    events_dir = _events_dir()
    shipped = sorted({p.name.split("_")[0] for p in events_dir.iterdir() if p.name.endswith("_events.tsv")})
    if not 1 <= n_subjects <= 50:
        raise ValueError("n_subjects must be between 1 and 50")
    rng = np.random.default_rng(seed)
    brain, affine = demo_grid(voxel_size)
    coords = _world_coords(brain.shape, affine)
    blobs = {name: brain & (np.linalg.norm(coords - np.array(c), axis=-1) <= BLOB_RADIUS_MM)
             for name, c in BLOBS.items()}

    root.mkdir(parents=True, exist_ok=True)
    (root / "README").write_text(
        "Simulated demo dataset made by bidsglm-demo. Event files are real (OpenNeuro ds000102,\n"
        "PDDL, Kelly et al. 2008); BOLD, masks and confounds are simulated with known activations:\n"
        "an occipital blob for every condition and a cingulate blob for incongruent trials only.\n"
        "The raw _bold.nii.gz files are header-valid all-zero stubs; the simulated data are in\n"
        "derivatives/fmriprep.\n")
    _write_json(root / f"task-{TASK}_bold.json", {"TaskName": TASK, "RepetitionTime": TR})
    participants = pd.read_csv(events_dir / "participants.tsv", sep="\t").set_index("participant_id")
    rows = []
    deriv = root / "derivatives" / "fmriprep"
    _write_json(deriv / "dataset_description.json", {
        "Name": "Simulated fMRIPrep-style outputs (bidsglm demo; not fMRIPrep)",
        "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "bidsglm-demo", "Description": "simulated BOLD with known activations"}],
    })
    for s in range(n_subjects):
        sub = f"{s + 1:02d}"
        source = shipped[s % len(shipped)]
        info = participants.loc[source]
        rows.append({"participant_id": f"sub-{sub}", "sex": bids_sex(info["gender"]), "age": info["age"]})
        for run in (1, 2):
            stem = f"sub-{sub}_task-{TASK}_run-{run}"
            events_file = events_dir / f"{source}_task-{TASK}_run-{run}_events.tsv"
            func = root / f"sub-{sub}" / "func"
            func.mkdir(parents=True, exist_ok=True)
            with resources.as_file(events_file) as ev_path:
                shutil.copyfile(ev_path, func / f"{stem}_events.tsv")
                events = pd.read_csv(ev_path, sep="\t")[["onset", "duration", "trial_type"]]
            _save(np.zeros(brain.shape + (N_VOLUMES,), np.int16), affine, func / f"{stem}_bold.nii.gz",
                  dtype=np.int16, tr=TR)
            out = deriv / f"sub-{sub}" / "func"
            bold = _simulate_run(rng, brain, affine, blobs, events, amplitude, noise_pct)
            prefix = f"{stem}_space-{SPACE}"
            _save(bold, affine, out / f"{prefix}_desc-preproc_bold.nii.gz", dtype=np.int16, slope=0.1, tr=TR)
            _write_json(out / f"{prefix}_desc-preproc_bold.json",
                        {"RepetitionTime": TR, "TaskName": TASK, "SkullStripped": False})
            _save(brain.astype(np.uint8), affine, out / f"{prefix}_desc-brain_mask.nii.gz", dtype=np.uint8)
            _write_json(out / f"{prefix}_desc-brain_mask.json", {"Type": "Brain"})
            conf = _confounds(rng, N_VOLUMES, outliers=(run == 2))
            conf.to_csv(out / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False,
                        na_rep="n/a", float_format="%.6g")
            _write_json(out / f"{stem}_desc-confounds_timeseries.json",
                        {c: {"Description": "simulated"} for c in conf.columns})
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    # written last: its presence marks a complete demo dataset
    _write_json(root / "dataset_description.json", {
        "Name": "bidsglm demo: simulated BOLD on real flanker timing",
        "BIDSVersion": "1.10.0", "DatasetType": "raw", "License": "PDDL",
        "Authors": ["bidsglm demo simulator"],
        "ReferencesAndLinks": ["Event timing from OpenNeuro ds000102 (PDDL); see README"],
    })
    return DemoTruth(affine, brain, blobs, amplitude)


SUBJECTS_RANGE = (1, 50)
VOXEL_SIZE_RANGE = (2, 10)  # 1 mm would be 8.5 million voxels x 150 volumes per run: gigabytes and minutes
OPTIONS_RECORD = Path("code") / "bidsglm-demo.json"  # BIDS keeps code/ out of validation


class _DemoParser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 64 (as bidsglm's own)
        sys.stderr.write(f"bidsglm-demo: error: {message} (usage: bidsglm-demo DIR [options]; see --help)\n")
        sys.exit(EX_USAGE)


def _whole_number_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    p = _DemoParser(
        prog="bidsglm-demo", description=__doc__.split("\n\n")[0],
        epilog="The dataset holds raw BIDS files (events, sidecars) and fMRIPrep-style derivatives under "
               "derivatives/fmriprep (MNI152NLin2009cAsym BOLD, brain masks, confounds), two flanker runs per "
               "participant with real event timing. Then: bidsglm OUTPUT OUT_DIR participant. A demo made with "
               "the same options in OUTPUT is reused; one made with other options, or any other non-empty "
               "OUTPUT, is refused (exit 64). Interrupted (Ctrl-C, exit 130) or failing to write (exit 73), "
               "it leaves nothing behind.")
    p.add_argument("output", type=Path, help="folder to create the demo BIDS dataset in (new or empty)")
    p.add_argument("--subjects", type=_whole_number_in(*SUBJECTS_RANGE), default=4,
                   help="number of participants, %d to %d (default 4)" % SUBJECTS_RANGE)
    p.add_argument("--voxel-size", type=_whole_number_in(*VOXEL_SIZE_RANGE), default=4,
                   help="voxel size of the simulated MNI grid in whole mm, %d to %d; smaller is slower and "
                        "larger on disk (default 4)" % VOXEL_SIZE_RANGE)
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the simulated noise: the same seed gives the same dataset (default 42)")
    p.add_argument("--surface", choices=["cifti", "gifti"], default=None,
                   help="also write surface BOLD: fsaverage5 GIfTI pairs, or CIFTI dtseries with fsLR 32k "
                        "cortex (see README, 'Surfaces and grayordinates')")
    return p


def _options_text(args) -> str:
    return f"--subjects {args.subjects} --voxel-size {args.voxel_size} --seed {args.seed}"


def _existing_demo_refusal(args) -> str | None:
    """Why OUTPUT cannot take (or be reused as) this demo, or None."""
    out = args.output
    if out.exists() and not out.is_dir():
        return f"{out} exists and is not a folder"
    desc = out / "dataset_description.json"
    if desc.is_file() and "bidsglm demo" in desc.read_text(errors="replace"):
        record = out / OPTIONS_RECORD
        made = json.loads(record.read_text()).get("options") if record.is_file() else None
        if made is not None and made != _options_text(args):
            return (f"{out} holds a demo made with {made}, not {_options_text(args)}; remove it or choose "
                    "another folder")
        return None
    if out.is_dir() and any(out.iterdir()):
        return f"{out} exists and is not empty"
    return None


def _remove_new_paths(root: Path, before: set[Path] | None) -> None:
    """Undo an interrupted or failed demo: remove ``root`` if it did not exist (``before`` is
    None), else every path under it that is not in ``before``."""
    if before is None:
        shutil.rmtree(root, ignore_errors=True)
        return
    for path in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if path not in before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _write_demo(args) -> str:
    desc = args.output / "dataset_description.json"
    if desc.is_file():
        message = f"demo dataset already present in {args.output}; reusing it"
        pattern = {"cifti": "*.dtseries.nii", "gifti": "*.func.gii"}.get(args.surface)
        if pattern and not next((args.output / "derivatives").rglob(pattern), None):
            from .demosurface import add_surface_runs

            add_surface_runs(args.output, args.surface)
        return message
    make_demo(args.output, args.subjects, args.voxel_size, seed=args.seed)
    _write_json(args.output / OPTIONS_RECORD, {"options": _options_text(args)})
    if args.surface:
        from .demosurface import add_surface_runs

        add_surface_runs(args.output, args.surface)
    return f"demo dataset written to {args.output}"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    refusal = _existing_demo_refusal(args)
    if refusal:
        print(f"bidsglm-demo: error: {refusal}", file=sys.stderr)
        return EX_USAGE
    before = set(args.output.rglob("*")) if args.output.is_dir() else None
    received: list = []
    previous = install_signal_handlers(received)
    try:
        message = _write_demo(args)
    except KeyboardInterrupt:
        _remove_new_paths(args.output, before)
        print("bidsglm-demo: interrupted; nothing of this demo was kept", file=sys.stderr)
        return 128 + received[0] if received and received[0] != signal.SIGINT else EX_INTERRUPTED
    except OSError as exc:
        _remove_new_paths(args.output, before)
        print(f"bidsglm-demo: error: cannot write the demo in {args.output}: {exc.strerror or exc} "
              f"({exc.filename or args.output})", file=sys.stderr)
        return EX_CANTCREAT
    except Exception as exc:  # a bug of the demo writer: one line, nothing kept
        _remove_new_paths(args.output, before)
        print(f"bidsglm-demo: internal error ({type(exc).__name__}: {exc}); nothing was kept", file=sys.stderr)
        return EX_SOFTWARE
    finally:
        restore_signal_handlers(previous)
    print(message)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
