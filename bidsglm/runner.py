"""Drives the participant level from parsed command-line options."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .design import contrast_labels, parse_contrast_option, read_events
from .discovery import SpaceSpec, discover_runs, find_derivatives
from .outputs import (
    active_session,
    attached,
    check_planned_folders,
    check_planned_names,
    copy_participants_table,
    dataset_links,
    ensure_dataset,
    forbid_inputs,
    func_dir,
    statmap_path,
)
from .surfaces import space_kind
from .participant import (
    ModelSettings,
    check_surface_geometries,
    fit_run,
    model_contrasts,
    prepare_run,
    subject_fixed_effects,
)

log = logging.getLogger("bidsglm")
DEFAULT_SPACE = "MNI152NLin2009cAsym"
VOLUME_SMOOTHING_FWHM = 6.0


def default_smoothing(args) -> float:
    """--smoothing-fwhm, or its default: 6 mm on volumes, none on surfaces and grayordinates (fMRIPrep
    resampled them already; a value > 0 smooths on the template mesh, surfaces.smooth_elements)."""
    if getattr(args, "smoothing_fwhm", None) is not None:
        return args.smoothing_fwhm
    space = (getattr(args, "space", None) or DEFAULT_SPACE).partition(":")[0]
    return 0.0 if space_kind(space) != "volume" else VOLUME_SMOOTHING_FWHM


def settings_from_args(args) -> ModelSettings:
    confounds = tuple(c for c in args.confounds if c.lower() != "none")
    return ModelSettings(
        confounds=confounds,
        smoothing_fwhm=default_smoothing(args) or None,
        hrf_model=args.hrf_model,
        drift_model=None if args.drift_model == "none" else args.drift_model,
        high_pass=args.high_pass,
        noise_model=args.noise_model,
        slice_time_ref=args.slice_time_ref,
        allow_tr_mismatch=args.allow_tr_mismatch,
    )


def _fit_in_worker(level, session, *fit_args):
    """joblib entry point: worker processes need their own logging set-up, and write
    under the parent's output session (its guard and journal)."""
    from .logs import configure_logging

    if not log.handlers:
        configure_logging(verbose=1 if level <= logging.DEBUG else 0, quiet=level >= logging.WARNING)
    with attached(session):
        return fit_run(*fit_args)


def run_participant_level(args, bids_dir: Path, output_dir: Path) -> list[str]:
    """Fit every selected run and subject; returns the subjects' labels."""
    from joblib import Parallel, delayed

    t_start = time.perf_counter()
    space = SpaceSpec.parse(args.space or DEFAULT_SPACE)
    derivatives = find_derivatives(bids_dir, args.derivatives)
    forbid_inputs(derivatives)
    runs = discover_runs(bids_dir, derivatives, space, args.participant_label,
                         args.session_label, args.task)
    settings = settings_from_args(args)
    requested = [parse_contrast_option(c) for c in args.contrast] if args.contrast else None
    log.info("found %d run(s) of %d participant(s) in %s", len(runs),
             len({r.subject for r in runs}), ", ".join(str(d) for d in derivatives))

    # check every run before computing anything: bad input stops the job early
    tasks = sorted({r.task for r in runs})
    plans = []
    for task in tasks:
        task_runs = [r for r in runs if r.task == task]
        events = {r.label: read_events(r.events) for r in task_runs}
        conditions = {label: set(ev["trial_type"]) for label, ev in events.items()}
        contrasts = model_contrasts(conditions, requested, task)
        labels = contrast_labels([c.name for c in contrasts])
        prepared = [prepare_run(r, settings, contrasts, events[r.label]) for r in task_runs]
        check_surface_geometries(prepared)
        plans.append((task, contrasts, labels, prepared))

    links = dataset_links(bids_dir, derivatives)
    check_planned_folders([output_dir, *(func_dir(output_dir, p.inputs.entities)
                                         for _, _, _, prepared in plans for p in prepared)])
    check_planned_names(statmap_path(output_dir, p.inputs.entities, labels[c.name], "variance")
                        for _, _, labels, prepared in plans for p in prepared for c in p.contrasts)
    n_written = 0
    for task, contrasts, labels, prepared in plans:
        fingerprint = settings.fingerprint(contrasts)
        log.info("task-%s: %d run(s), contrasts: %s", task, len(prepared),
                 ", ".join(f"{c.name} [{labels[c.name]}]" for c in contrasts))
        jobs = (delayed(_fit_in_worker)(log.level, active_session(), p, settings, output_dir, labels, links, fingerprint)
                for p in prepared)
        if args.n_cpus > 1 and len(prepared) > 1:
            results = Parallel(n_jobs=min(args.n_cpus, len(prepared)))(jobs)
        else:
            results = [fit_run(p, settings, output_dir, labels, links, fingerprint) for p in prepared]
        by_subject: dict[tuple, list] = {}
        for res in results:
            key = (res.inputs.subject, res.inputs.entities.get("ses"))
            by_subject.setdefault(key, []).append(res)
        for (sub, ses), sub_results in by_subject.items():
            written = subject_fixed_effects(sub_results, contrasts, labels, output_dir, settings, links)
            n_written += len(written)
            log.info("sub-%s%s task-%s: fixed effects over %d run(s) written (%d maps)", sub,
                     f" ses-{ses}" if ses else "", task, len(sub_results), len(written))
    # dataset-level files last: array jobs share them, and a job that fails must not
    # remove (roll back) a file that another, successful job relies on
    ensure_dataset(output_dir, links)
    copy_participants_table(bids_dir, output_dir)
    n_runs = sum(len(prepared) for _, _, _, prepared in plans)
    log.info("participant level done in %.1f s: %d run(s) of %d participant(s), %d subject-level maps; "
             "results in %s", time.perf_counter() - t_start, n_runs, len({r.subject for r in runs}),
             n_written, output_dir)
    return sorted({r.subject for r in runs})

