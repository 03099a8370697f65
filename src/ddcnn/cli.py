"""The ``ddcnn`` command: parsing and printing only; the work is in ``ddcnn.train`` and ``ddcnn.report``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shlex
import sys
from pathlib import Path

from ddcnn.errors import DDCNNError
from ddcnn.paths import user_path


def _version() -> str:
    from ddcnn import __version__

    return __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddcnn", description="Model-parallel CNN training by domain decomposition.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.add_argument("--version", action="version", version=f"ddcnn {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the experiment a YAML config describes")
    run.add_argument("config", help="YAML config, e.g. configs/fashion_mnist_2x2.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set stages.local.epochs=5 (stages.*.epochs for all)")
    run.add_argument("--out", help="run directory (default: the config's own folder when it is a run directory, as "
                                   "for runs/NAME/config.yaml, else runs/<name>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    run.add_argument("--force", action="store_true", help="start over in an --out that already holds files")
    run.add_argument("--quiet", action="store_true", help="print only the results")
    run.add_argument("--stage-store", metavar="DIR", help="a folder of finished stages that runs share: a stage "
                     "whose identity it holds is reused (checked, linked or copied into the run), one trained here "
                     "is added (ddcnn study gives STUDY/stages)")
    _trust_option(run)

    ev = sub.add_parser("evaluate", help="re-evaluate a run's saved models on the test set")
    ev.add_argument("run_dir")
    ev.add_argument("--device", help="cpu, cuda, cuda:N (default: the run's)")
    _data_root_option(ev)
    _trust_option(ev)

    pr = sub.add_parser("predict", help="classify image files with a run's models (or a file of `ddcnn export`)")
    pr.add_argument("run_dir", help="a run directory, or a .pt2 or .onnx file of `ddcnn export` (its .json beside)")
    pr.add_argument("files", nargs="+", help="image files (PNG, JPEG, ...; 8- or 16-bit) or .npy arrays/volumes "
                                             "(integer pixels 0-255 or uint16; floats in the training images' "
                                             "scale, [0, 1] for photos)")
    pr.add_argument("--strategy", help="global, cnn_dnn, mean_probability, majority_vote, coherent or transfer "
                                       "(default: the run's best)")
    pr.add_argument("--device", help="cpu, cuda, cuda:N (default: the run's)")
    pr.add_argument("--format", default="text", help="text (default), json (a list of one object per file) or csv "
                                                     "(a header row, one row per file): with every class's "
                                                     "probability")
    _trust_option(pr)

    ex = sub.add_parser("export", help="write one strategy of a run as a deployable .pt2 or .onnx file, checked "
                                       "against the run")
    ex.add_argument("run_dir")
    ex.add_argument("--strategy", help="global, cnn_dnn, mean_probability, majority_vote, coherent or transfer "
                                       "(default: the run's best)")
    ex.add_argument("--format", default="pt2", choices=("pt2", "onnx"),
                    help="pt2: torch.export (torch.export.load); onnx: ONNX (needs ddcnn[export]); default pt2")
    ex.add_argument("--out", help="the file to write (default RUN/export/STRATEGY.FORMAT); FILE.json goes beside")
    ex.add_argument("--layout", choices=("grouped", "separate"),
                    help="the local CNNs as one grouped network, or as N ordinary branches for runtimes that run "
                         "grouped convolutions badly (default grouped; separate for foreign backbones)")
    _data_root_option(ex)
    _trust_option(ex)

    show = sub.add_parser("show", help="decomposition, sizes, parameters and FLOPs of a config; PNG of the grid")
    show.add_argument("config")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument("--png", metavar="FILE", help="also draw the grid over a sample image into FILE (a PNG)")
    _trust_option(show)

    study = sub.add_parser("study", help="run a config over axes of values and seeds; means, CIs, paired claims")
    study.add_argument("study", help="study YAML, e.g. studies/fashion_mnist_claims.yaml")
    study.add_argument("--out", help="study directory (default runs/<study name>)")
    study.add_argument("--jobs", type=int, default=1, help="runs at once (threads split; one GPU each)")
    study.add_argument("--resume", action="store_true", help="run what is not finished; finished runs are kept")
    mode = study.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", action="store_true", help="print one `ddcnn run` line per run to do")
    mode.add_argument("--aggregate", action="store_true", help="only aggregate the runs that exist")
    mode.add_argument("--time", action="store_true", help="a budget study's timing pass, run alone after the sweep: "
                      "repeated short timings of every stage (timing.json), then the aggregate")
    _trust_option(study)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="find or download fashion-mnist, mnist or cifar10")
    fetch.add_argument("name")
    fetch.add_argument("--dir", help="folder to look in / download into")
    return p


def _data_root_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", metavar="DIR", help="where the run's data is now (a run moved to another "
                                                           "machine; default: the folder its config.yaml records)")


def _trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-code", action="store_true",
                        help="import and run the backbone that a run's or study's own files name by import path, "
                             "and load a .pt2 program (a config of your own outside the run directory is trusted "
                             "already; share and predict with the .onnx file instead)")


def _trusted(config: Path, trust_code: bool, out: Path | None = None) -> tuple[bool, str]:
    """Whether an imported backbone that ``config`` names may be imported, and how errors name the file: decided
    from what the user typed, before anything is imported. A config that lies inside the directory the command
    writes (``out``: the run or study directory, as --out or --resume name it) is that directory's data, which
    someone may have sent, marker or not; so is one beside a run's or study's marker. Either is trusted only with
    --trust-code; any other config file the user gives is their own."""
    from ddcnn.study.runner import SPEC_FILE
    from ddcnn.train.store.rundir import MARKER

    if trust_code:
        return True, repr(str(config))
    try:
        file = config.resolve()
        folder = file.parent
        saved = (folder / MARKER).exists() or (folder / SPEC_FILE).exists()
        if out is not None:
            saved = saved or file.is_relative_to(out.resolve())
    except (OSError, RuntimeError):  # a path that does not resolve: not trusted (load_config says what is wrong)
        saved = True
    return not saved, repr(str(config))


def cmd_run(args) -> int:
    from ddcnn.config import load_config
    from ddcnn.errors import ConfigError
    from ddcnn.report import format_table
    from ddcnn.train.protocol import Experiment

    if args.resume and args.force:
        raise ConfigError("--resume continues the run in --out and --force starts it over: give one of them")

    config = user_path(args.config, "the config file")
    cfg = load_config(config, args.overrides)
    out = user_path(args.out, "--out") if args.out else default_out(config, cfg.name)
    trusted, source = _trusted(config, args.trust_code, out)
    results = Experiment(cfg, out, resume=args.resume, force=args.force, command=command_line(args.argv),
                         verbose=not args.quiet, trusted=trusted, source=source,
                         stage_store=user_path(args.stage_store, "--stage-store") if args.stage_store else None).run()
    if results is not None:  # None on the ranks > 0 of a torchrun launch: rank 0 reports
        print(format_table(results))
        print(f"report: {out / 'report.md'}")
    return 0


def command_line(argv: list[str] | None = None, environ=None) -> str:
    """The command as the user typed it, for the records: ``ddcnn ARGS``, or under torchrun ``torchrun
    --nnodes=M --nproc-per-node=P -m ddcnn ARGS`` (the launcher's other options, such as the rendezvous, are not
    visible to its workers)."""
    environ = os.environ if environ is None else environ
    args = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    world = environ.get("WORLD_SIZE", "1")
    if world in ("", "1") and "TORCHELASTIC_RUN_ID" not in environ:
        return f"ddcnn {args}"
    nodes = environ.get("GROUP_WORLD_SIZE")
    per_node = environ.get("LOCAL_WORLD_SIZE") or world
    launcher = "torchrun" + (f" --nnodes={nodes}" if nodes and nodes != "1" else "")
    return f"{launcher} --nproc-per-node={per_node} -m ddcnn {args}"


def default_out(config: Path, name: str) -> Path:
    """The run directory when ``--out`` is not given: the config's own folder when it is a run directory (its
    ``config.yaml`` beside the run marker, so that ``ddcnn run runs/x/config.yaml --resume`` continues runs/x), else
    ``runs/<name>``."""
    from ddcnn.train.store.rundir import MARKER

    if (config.parent / MARKER).exists():
        return config.parent
    return user_path(Path("runs") / name, "the run directory runs/NAME (from the config's name)")


def cmd_evaluate(args) -> int:
    from ddcnn.report import format_table
    from ddcnn.train.evaluate import evaluate_run

    run_dir = user_path(args.run_dir, "the run directory")
    with _processes() as env:
        results = evaluate_run(run_dir, device=args.device, env=env, trust_code=args.trust_code,
                               data_root=args.data_root)
    if results is not None:  # rank 0 (or the only process)
        print(format_table(results))
        print(f"written: {run_dir / 'evaluation.json'}")
    return 0


def cmd_predict(args) -> int:
    from ddcnn.checks import choice
    from ddcnn.export import is_exported
    from ddcnn.finished.predictions import FORMATS, Predictions, format_predictions

    choice("--format", args.format, FORMATS)  # before the models are loaded
    files = [str(user_path(f, "the file")) for f in args.files]
    run_dir = user_path(args.run_dir, "the run directory")
    if is_exported(run_dir):
        return _predict_exported(args, files)
    predictions: Predictions | None
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # one process: the finished-run library, no training code
        from ddcnn.finished.run import predict_files

        predictions = predict_files(run_dir, files, strategy=args.strategy, device=args.device,
                                    trust_code=args.trust_code)
    else:
        from ddcnn.train.evaluate import predict_files as predict_sharded

        with _processes() as env:
            predictions = predict_sharded(run_dir, files, strategy=args.strategy, device=args.device, env=env,
                                          trust_code=args.trust_code)
    if predictions is not None:  # rank 0 (or the only process)
        for note in predictions.notes:
            print(f"ddcnn: note: {note}", file=sys.stderr)
        print(format_predictions(predictions, args.format))
    return 0


def _predict_exported(args, files: list[str]) -> int:
    """``ddcnn predict FILE.pt2|FILE.onnx``: the exported model's strategy is the one it holds."""
    from ddcnn.errors import ConfigError
    from ddcnn.export import predict_exported
    from ddcnn.finished.predictions import format_predictions

    for option in ("strategy", "device"):
        if getattr(args, option) is not None:
            raise ConfigError(f"--{option} applies to a run directory; an exported file holds one strategy and "
                              f"runs on the CPU (export another --strategy for another)")
    predictions = predict_exported(user_path(args.run_dir, "the exported file"), files, trust_code=args.trust_code)
    for note in predictions.notes:
        print(f"ddcnn: note: {note}", file=sys.stderr)
    print(format_predictions(predictions, args.format))
    return 0


def cmd_export(args) -> int:
    from ddcnn.export import export_run

    out = user_path(args.out, "--out") if args.out is not None else None
    done = export_run(user_path(args.run_dir, "the run directory"), args.strategy, args.format, out, args.layout,
                      trust_code=args.trust_code, data_root=args.data_root)
    layout = f", layout {done.layout}" if done.layout else ""
    print(f"checked on {done.checked} images ({done.checked_on}): largest absolute difference "
          f"{done.max_abs_diff:.2g}, {done.agree} of {done.checked} predicted classes agree")
    print(f"written: {done.path} ({done.strategy}{layout}) and {done.meta_path.name}")
    return 0


@contextlib.contextmanager
def _processes():
    """The ranks torchrun set (one process without it); the process group, if one is joined, is left at the end."""
    from ddcnn.train import dist

    env = dist.env_from_environment()
    try:
        yield env
    finally:
        dist.shutdown()


def cmd_show(args) -> int:
    from ddcnn.config import load_config
    from ddcnn.describe import describe

    config = user_path(args.config, "the config file")
    cfg = load_config(config, args.overrides)
    trusted, source = _trusted(config, args.trust_code)
    print(describe(cfg, user_path(args.png, "--png") if args.png is not None else None, trusted, source))
    return 0


def cmd_study(args) -> int:
    from ddcnn.study import run_study

    path = user_path(args.study, "the study file")
    out = user_path(args.out, "--out") if args.out is not None else None
    trusted, _ = _trusted(path, args.trust_code, out)
    return run_study(path, out, jobs=args.jobs,
                     resume=args.resume, print_commands=args.print_commands, aggregate_only=args.aggregate,
                     time_only=args.time,
                     command=command_line(args.argv), trusted=trusted)


def cmd_data(args) -> int:
    from ddcnn.data.fetch import fetch

    print(fetch(args.name, user_path(args.dir, "--dir") if args.dir is not None else None))
    return 0


def _error(message: str) -> int:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    print(f"ddcnn: error: {' '.join(lines)}", file=sys.stderr)  # one line, whatever the message held
    return 2


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that the flush at exit cannot fail a second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture): nothing to flush at exit
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, before or after the command
    args = _parser().parse_args([a for a in argv if a != "--debug"])
    args.argv = argv  # the records' command line: what was typed
    handlers = {"run": cmd_run, "evaluate": cmd_evaluate, "predict": cmd_predict, "export": cmd_export,
                "show": cmd_show,
                "data": cmd_data, "study": cmd_study}
    debug = debug or os.environ.get("DDCNN_DEBUG", "0") not in ("", "0")
    try:
        status = handlers[args.command](args)
        sys.stdout.flush()  # here, not at exit: a full disk or a closed pipe is then one of the cases below
        return status
    except DDCNNError as err:
        if debug:
            raise
        return _error(str(err))
    except BrokenPipeError:  # the output went to a pipe that closed early (e.g. `| head`)
        _silence_stdout()
        return 0
    except OSError as err:  # the operating system refused: a full disk, a read-only or vanished folder...
        if debug:
            raise
        if err.filename is None:  # a write to standard output (the only file ddcnn does not name)
            _silence_stdout()
            return _error(f"cannot write the output ({err.strerror or err}); free space on the device it goes to, "
                          f"or send it elsewhere")
        fix = "free some space on that device (a stopped run continues with --resume)" \
            if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check that path, or choose another --out"
        return _error(f"{err.filename}: {err.strerror or err}; {fix}")
    except KeyboardInterrupt:
        print("ddcnn: interrupted; continue with --resume", file=sys.stderr)
        return 130

