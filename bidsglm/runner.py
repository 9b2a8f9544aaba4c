"""Drives the participant level from parsed command-line options."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .design import contrast_labels, parse_contrast_option, read_events
from .discovery import SpaceSpec, discover_runs, find_derivatives
from .errors import UsageError
from .outputs import (
    active_session,
    atomic_write_bytes,
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
    _completion_record,
    _existing_result,
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


def _fit_staged(level, prep, settings, labels, links, fingerprint):
    """Dask task: fit one run into a private folder on the worker; returns its result and the
    files written (path relative to the folder -> bytes). Nothing is written to OUTPUT_DIR here."""
    import tempfile

    from .logs import configure_logging

    if not log.handlers:
        configure_logging(verbose=1 if level <= logging.DEBUG else 0, quiet=level >= logging.WARNING)
    # a worker thread of the calling process (LocalCluster(processes=False)) shares its output
    # session, whose guard allows OUTPUT_DIR only: stage in the session's temporary folder there
    session = active_session()
    with tempfile.TemporaryDirectory(prefix="bidsglm-run-", dir=session.tmp_dir if session else None) as folder:
        staging = Path(folder)
        result = fit_run(prep, settings, staging, labels, links, fingerprint)
        files = {p.relative_to(staging).as_posix(): p.read_bytes()
                 for p in sorted(staging.rglob("*")) if p.is_file()}
    return result, str(staging), files


def fit_on_dask(address: str, prepared: list, settings, output_dir: Path, labels, links, fingerprint) -> list:
    """Runs fitted on an existing dask.distributed cluster (``--dask-scheduler``).

    Workers fit runs and send their files back; they are written here, under this invocation's
    output session (guard, journal, rollback), so an error or an interrupt leaves nothing partial
    whatever the workers are still doing. Runs already done with this model are reused without
    being sent (resumability, as locally); the first run that fails stops the rest and is raised."""
    from distributed import Client, as_completed

    results = {i: _existing_result(p, output_dir, fingerprint, labels) for i, p in enumerate(prepared)}
    for i in [i for i, r in results.items() if r is not None]:
        log.info("%s: already done with this model, reusing its maps", prepared[i].inputs.label)
    todo = [i for i, r in results.items() if r is None]
    if not todo:
        return [results[i] for i in range(len(prepared))]
    try:
        client = Client(address, timeout=DASK_CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        raise UsageError(f"--dask-scheduler {address}: cannot connect to a Dask scheduler there ({exc})") from exc
    with client:
        futures = {client.submit(_fit_staged, log.level, prepared[i], settings, labels, links, fingerprint,
                                 pure=False): i for i in todo}
        log.info("%d run(s) sent to the Dask cluster at %s (%d worker(s))", len(todo), address,
                 len(client.scheduler_info().get("workers", {})))
        try:
            for future in as_completed(futures):
                result, staging, files = future.result()  # a run's error is raised here
                results[futures[future]] = _write_staged(prepared[futures[future]], result, Path(staging),
                                                         files, output_dir)
        except BaseException:
            client.cancel(list(futures))
            raise
    return [results[i] for i in range(len(prepared))]


DASK_CONNECT_TIMEOUT_S = 30


def _write_staged(prep, result, staging: Path, files: dict, output_dir: Path):
    """A worker's files written into OUTPUT_DIR (the completion record last, as fit_run does);
    the result's paths moved from the worker's folder to OUTPUT_DIR."""
    record = _completion_record(prep, staging).relative_to(staging).as_posix()
    for rel in sorted(files, key=lambda r: r == record):
        atomic_write_bytes(output_dir / rel, files[rel])

    def moved(path):
        return output_dir / Path(path).relative_to(staging) if path is not None else None

    result.maps = {name: {stat: moved(p) for stat, p in maps.items()} for name, maps in result.maps.items()}
    result.mask_path = moved(result.mask_path)
    return result


def _log_earlier_contrasts(output_dir: Path, entities: dict, labels: dict, task: str) -> None:
    """Maps of contrasts an earlier run wrote stay (contrasts may be added one command at a time),
    and the group level models them: say so, per subject."""
    from .groupinputs import earlier_contrasts

    earlier = earlier_contrasts(output_dir, entities, labels)
    if earlier:
        ses = f" ses-{entities['ses']}" if entities.get("ses") else ""
        log.warning("sub-%s%s task-%s: OUTPUT_DIR also holds subject-level maps of contrast(s) %s from an "
                    "earlier run, not written by this one; the group level will model them too (delete their "
                    "files or use a new OUTPUT_DIR to drop them)", entities["sub"], ses, task, ", ".join(earlier))


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
        if getattr(args, "dask_scheduler", None):
            results = fit_on_dask(args.dask_scheduler, prepared, settings, output_dir, labels, links, fingerprint)
        elif args.n_cpus > 1 and len(prepared) > 1:
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
            _log_earlier_contrasts(output_dir, sub_results[0].inputs.entities, labels, task)
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

