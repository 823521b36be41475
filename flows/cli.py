"""``transfer-pipeline``: run, plan, demo, serve or deploy on a schedule or on new data, watch a
data folder, serve or batch-score a registered model, export a registered model as a Triton model
repository."""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import os
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

# Offline by default: no analytics, and component loggers show up in Prefect's run logs.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "components")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from components.common.config import PipelineConfig, load_config
from components.common.errors import ConfigError, PipelineError


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _config(args: argparse.Namespace) -> PipelineConfig:
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.device=cpu), got {item!r}")
        overrides[key] = _parse_value(value)
    if getattr(args, "case", None) and args.case != "auto":
        overrides["strategy.case"] = int(args.case)
    if getattr(args, "promote", None):
        overrides["tracking.promote"] = args.promote
    if args.output_dir:
        overrides["output_dir"] = str(args.output_dir)
    return load_config(args.config, overrides)


def _print_summary(summary: dict[str, Any]) -> None:
    if summary.get("skipped"):
        since = summary["unchanged_since"]
        print(f"\n{summary['reason']}")
        print(f"model: {since['model_uri']} (run folder {since['run_dir']})")
        print(f"took {summary['seconds']:.1f} s")
        return
    print(
        f"\ncase {summary['case']}{' (cut after ' + summary['cut'] + ')' if summary.get('cut') else ''}"
    )
    print(f"why: {summary['reason']}")
    sim = summary["similarity"]
    profile = (
        f"; against the stored profile {sim['profile']['score']:.2f} (MMD² {sim['profile']['mmd2']:.3f})"
        if sim.get("profile")
        else ""
    )
    print(
        f"similarity {sim['score']:.2f} (90% interval {sim['low']:.2f}-{sim['high']:.2f}, "
        f"mean BatchNorm KL {sim['mean_kl']:.2f}){profile}"
    )
    scan = summary.get("scan") or {}
    for note in scan.get("notes", []):
        print(f"note: {note}")
    if scan.get("clutter_summary"):
        print(scan["clutter_summary"])
    if scan.get("skipped"):
        print(f"skipped {len(scan['skipped'])} entr{'y' if len(scan['skipped']) == 1 else 'ies'}:")
        for s in scan["skipped"][:10]:
            print(f"  {s['path']}: {s['reason']}")
    if summary.get("quarantined"):
        print(f"quarantined {len(summary['quarantined'])} file(s):")
        for q in summary["quarantined"][:10]:
            print(f"  {q['path']}: {q['reason']}")
    if "metrics" in summary:
        for split, a in summary.get("accuracy", {}).items():
            name = {"val": "validation", "test": "test"}.get(split, split)
            print(
                f"{name} accuracy {a['value']:.4f} (95% CI {a['low']:.3f}-{a['high']:.3f}, "
                f"n={a['n']}; balanced {a['balanced']:.3f}, macro-F1 {a['macro_f1']:.3f})"
            )
        print(f"trained on {summary['device']}")
        print(
            f"ONNX model: {summary['onnx_path']} (max |diff| vs PyTorch {summary['onnx_max_abs_diff']:.1e})"
        )
        print(f"MLflow run: {summary['mlflow_run_id']} at {summary['mlflow_tracking_uri']}")
        print(f"registered: {summary['model_uri']}")
        _print_promotion(summary["promotion"], summary["mlflow_tracking_uri"])
    print(f"report: {summary['report']}")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary["stage_seconds"].items())
    print(f"took {summary['seconds']:.1f} s ({stages})")


def _print_promotion(gate: dict[str, Any], tracking_uri: str) -> None:
    def score(role: str) -> str:
        acc, ci = gate[f"{role}_accuracy"], gate[f"{role}_interval"]
        version = gate[f"{role}_version"]
        return f"{role} v{version} {acc:.4f} (95% {ci[0]:.4f}-{ci[1]:.4f})"

    print(f"promotion: {gate['verdict']} (promote={gate['mode']}): {gate['reason']}")
    if gate.get("challenger_accuracy") is not None:
        versus = f" vs {score('champion')}" if gate.get("champion_accuracy") is not None else ""
        p = f"; McNemar p = {gate['p_value']:.4f}" if gate.get("p_value") is not None else ""
        print(f"  {score('challenger')}{versus} on {gate['n']} {gate['split']} images{p}")
    if gate.get("champion_uri"):
        from components.deploy.tracking import resolve_tracking_uri

        default = PipelineConfig()
        where = (
            ""
            if tracking_uri == resolve_tracking_uri(default.tracking, default.output_dir)
            else f" --set tracking.tracking_uri={tracking_uri}"
        )
        print(f"champion: {gate['champion_uri']} (v{gate['champion_now']})")
        print(f"serve it: transfer-pipeline serve-model --model-uri {gate['champion_uri']}{where}")


def start_prefect_api_early() -> threading.Thread | None:
    """Boot Prefect's temporary local API server in the background; None when one is configured.

    With no ``PREFECT_API_URL``, Prefect starts a server process on the first flow call and waits
    for it (7 s on 2 CPUs). Started before torch, timm and Great Expectations are imported (8-10 s),
    it boots on the other core meanwhile; the flow then finds it running, since Prefect keeps one
    such server per process. The server is ``flows.ephemeral_api.OwnedAPIServer``: on a port the
    kernel gave this process alone, and gone as soon as this process is, even after a SIGKILL.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from flows.ephemeral_api import start_owned_server

    thread = threading.Thread(target=start_owned_server, name="prefect-api-start", daemon=True)
    thread.start()
    return thread


def check_layout(data: str, cfg: PipelineConfig) -> None:
    """Refuse a missing folder or an ambiguous layout now, in a fraction of a second, rather than
    after Prefect, torch and the backbone have started; the scan decides again, the same way."""
    from components.data.layout import open_layout

    open_layout(Path(data), cfg.data.follow_external_links)


def _run_flow(
    kind: str,
    data: str,
    cfg: PipelineConfig,
    as_json: bool,
    debug: bool = False,
    force: bool = False,
) -> int:
    check_layout(data, cfg)
    booting = start_prefect_api_early()
    from flows.transfer import FLOWS
    from tasks.common.logs import quiet_user_errors

    if booting is not None:
        booting.join()  # a failed start is retried, and reported, by the flow call itself
    kwargs: dict[str, Any] = {"data": data, "config": cfg}
    if kind == "run":
        kwargs["force"] = force
    if debug:
        summary = FLOWS[kind](**kwargs)
    else:
        with quiet_user_errors():
            summary = FLOWS[kind](**kwargs)
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    else:
        _print_summary(summary)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    return _run_flow("run", args.data, _config(args), args.json, args.debug, args.force)


def _cmd_plan(args: argparse.Namespace) -> int:
    return _run_flow("plan", args.data, _config(args), args.json, args.debug)


def _cmd_demo(args: argparse.Namespace) -> int:
    from components.data.demo_data import materialise_digits

    cfg = _config(args)
    data = materialise_digits(cfg.output_dir / "demo-data" / "digits")
    print(f"demo data: scikit-learn's handwritten digits written to {data}", file=sys.stderr)
    return _run_flow("run", str(data), cfg, args.json, args.debug, args.force)


def _cron(text: str) -> str | None:
    return None if text.strip().lower() in ("", "off", "none") else text


def _cmd_serve_schedule(args: argparse.Namespace) -> int:
    from flows.automation import retraining_options
    from flows.transfer import transfer_flow

    cfg = _config(args)
    check_layout(args.data, cfg)
    if args.on_new_data:
        from flows.automation import require_api

        require_api()  # the events come through a server that outlives this process
    transfer_flow.serve(
        **retraining_options(Path(args.data), cfg, args.name, _cron(args.cron), args.on_new_data)
    )
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from components.data.naming import dataset_name
    from flows.automation import deploy_retraining, require_api

    cfg = _config(args)
    check_layout(args.data, cfg)
    cron = _cron(args.cron)
    if cron is None and not args.on_new_data:
        raise ConfigError("--cron off without --on-new-data: nothing would ever start a run")
    url = require_api()
    name = args.name or f"retrain-{dataset_name(Path(args.data).resolve(), cfg.data.name)}"
    deployment_id = deploy_retraining(Path(args.data), cfg, name, args.pool, cron, args.on_new_data)
    when = [f"cron {cron!r}"] if cron else []
    when += ["each transfer.dataset.updated event of the folder"] if args.on_new_data else []
    print(f"deployment transfer-pipeline/{name} ({deployment_id}) on {url}")
    print(f"runs on: {' and '.join(when)}; work pool {args.pool!r}")
    print(f"start a worker: prefect worker start --pool {args.pool}")
    if args.on_new_data:
        print(f"send the events: transfer-pipeline watch --data {Path(args.data).resolve()}")
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    import signal

    from components.data.watching import FolderWatcher
    from flows.automation import emit_dataset_updated, require_api

    cfg = _config(args)
    url = require_api()
    polling = True if args.poll else None
    watcher = FolderWatcher(
        Path(args.data), args.quiet, polling, args.poll_interval, cfg.data.follow_external_links
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    how = f"polling every {args.poll_interval:g} s" if watcher.polling else "inotify"
    print(
        f"watching {watcher.root} ({how}; an event {args.quiet:g} s after the last change) "
        f"for {url}; digest now {watcher.digest[:12]}",
        file=sys.stderr,
        flush=True,
    )
    for batch in watcher.batches(stop):
        event = emit_dataset_updated(batch)
        print(
            f"event {event.id if event else '(not sent)'}: +{len(batch.added)} "
            f"-{len(batch.removed)} ~{len(batch.changed)} files, {batch.files} in all, "
            f"digest {batch.digest[:12]}",
            file=sys.stderr,
            flush=True,
        )
    return 0


def _registered(args: argparse.Namespace, cfg: PipelineConfig) -> tuple[str, str]:
    """The tracking URI and the model URI, ``models:/NAME`` meaning the serving alias."""
    from components.deploy import reload, tracking

    return (
        tracking.resolve_tracking_uri(cfg.tracking, cfg.output_dir),
        reload.with_alias(args.model_uri, cfg.serve.alias),
    )


def _cmd_serve_model(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from components.deploy.reload import ModelHolder
    from components.deploy.server import serve
    from components.deploy.serving_app import create_app, inference_threads

    cfg = _config(args)
    tracking_uri, model_uri = _registered(args, cfg)
    try:
        holder = ModelHolder.from_registry(model_uri, tracking_uri, inference_threads(cfg.serve))
    except (MlflowException, ValueError) as err:
        raise PipelineError(f"cannot load {model_uri} from {tracking_uri}: {err}") from None
    host = args.host or cfg.serve.host
    port = cfg.serve.port if args.port is None else args.port
    model = holder.current
    print(
        f"serving {model_uri} ({model.name} version {model.version}) on http://{host}:{port}",
        file=sys.stderr,
    )
    try:
        serve(create_app(holder, cfg.serve), host, port)
    finally:
        holder.close()
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import tempfile

    from mlflow.exceptions import MlflowException

    from components.deploy import tracking
    from components.deploy.batch_predict import predict_folder
    from components.engine.images import Preprocessing

    cfg = _config(args)
    if not Path(args.data).is_dir():
        raise PipelineError(f"--data {args.data} is not a folder")
    tracking_uri, model_uri = _registered(args, cfg)
    with tempfile.TemporaryDirectory(prefix="predict-") as tmp:
        try:
            name, version = tracking.resolve_model_version(model_uri, tracking_uri)
            onnx_path, labels, prep = tracking.load_registered(
                f"models:/{name}/{version}", tracking_uri, Path(tmp)
            )
        except (MlflowException, ValueError) as err:
            raise PipelineError(f"cannot load {model_uri} from {tracking_uri}: {err}") from None
        result = predict_folder(
            onnx_path,
            labels,
            Preprocessing.from_dict(prep),
            Path(args.data),
            Path(args.out),
            cfg.data.extensions,
            cfg.validation.max_image_pixels,
        )
    print(
        f"{name} version {version}: {result.scored} images scored into {result.out_csv}",
        file=sys.stderr,
    )
    if result.bad:
        print(f"{len(result.bad)} file(s) left out:", file=sys.stderr)
        for path, reason in result.bad:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 0


def _cmd_export_triton(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from components.deploy import tracking, triton

    cfg = _config(args)
    uri = tracking.resolve_tracking_uri(cfg.tracking, cfg.output_dir)
    try:
        name, version = tracking.resolve_version(args.model_uri, uri)
    except (ValueError, MlflowException) as err:
        raise PipelineError(f"cannot find {args.model_uri} in {uri}: {err}") from None
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, labels, prep = tracking.load_registered(args.model_uri, uri, Path(tmp))
        model_dir = triton.write_repository(
            onnx_path, labels, args.name or name, version, args.out, args.max_batch_size, prep
        )
    print(f"Triton model repository: {model_dir} (version {version} of {name})")
    print(f"serve it: tritonserver --model-repository {Path(args.out).resolve()}")
    return 0


def force_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help="run even when the data, configuration and backbone equal the last successful run's, "
        "and from scratch: no verification verdict or fine-tuned weights taken from it",
    )


def on_new_data_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--on-new-data",
        action="store_true",
        help="also run on each transfer.dataset.updated event of the folder (see watch)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transfer-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="pipeline.yaml with any of the config sections")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.device=cpu"
        )
        p.add_argument(
            "--output-dir", type=Path, help="where runs, the feature cache and mlruns go"
        )
        p.add_argument("--debug", action="store_true", help="show the traceback of an error, too")

    def promote_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--promote",
            choices=["auto", "never", "force"],
            help="champion alias: auto = the gate decides (default: tracking.promote), "
            "never = leave it, force = move it to this version",
        )

    for name, func, text in (
        ("run", _cmd_run, "train, export and register a model"),
        ("plan", _cmd_plan, "decide the case and report why; train nothing"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--data", required=True, help="ROOT/<class>/* or ROOT/{train,val[,test]}/<class>/*"
        )
        p.add_argument("--case", choices=["auto", "1", "2", "3", "4"], default="auto")
        p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
        if name == "run":
            promote_option(p)
            force_option(p)
        common(p)
        p.set_defaults(func=func)
    p = sub.add_parser("demo", help="run the flow on scikit-learn's bundled digits")
    p.add_argument("--case", choices=["auto", "1", "2", "3", "4"], default="auto")
    p.add_argument("--json", action="store_true")
    promote_option(p)
    force_option(p)
    common(p)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("serve-schedule", help="serve the flow with a cron schedule (Prefect)")
    p.add_argument("--data", required=True)
    p.add_argument("--cron", default="0 3 * * 1", help="cron expression (default: Mondays 03:00)")
    p.add_argument("--name", default="scheduled-retrain")
    on_new_data_option(p)
    common(p)
    p.set_defaults(func=_cmd_serve_schedule)
    p = sub.add_parser(
        "deploy", help="register the flow on the Prefect server at PREFECT_API_URL (a work pool)"
    )
    p.add_argument("--data", required=True)
    p.add_argument(
        "--cron", default="0 3 * * 1", help="cron expression (default: Mondays 03:00; off: none)"
    )
    p.add_argument("--pool", default="transfer-pipeline", help="a process work pool")
    p.add_argument("--name", help="deployment name (default: retrain-DATASET)")
    on_new_data_option(p)
    common(p)
    p.set_defaults(func=_cmd_deploy)
    p = sub.add_parser(
        "watch", help="send transfer.dataset.updated to PREFECT_API_URL when the folder changes"
    )
    p.add_argument("--data", required=True, help="the folder to watch")
    p.add_argument(
        "--quiet", type=float, default=5.0, help="seconds without a change before the event"
    )
    p.add_argument(
        "--poll", action="store_true", help="poll (network file systems; automatic on NFS/SMB)"
    )
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls")
    common(p)
    p.set_defaults(func=_cmd_watch)
    p = sub.add_parser(
        "serve-model", help="serve a registered model over HTTP (OIP v2, ONNX Runtime)"
    )
    p.add_argument(
        "--model-uri",
        required=True,
        help="models:/NAME@ALIAS (followed as it moves), models:/NAME/VERSION, or models:/NAME "
        "(the serve.alias alias, champion by default)",
    )
    p.add_argument("--host", help="default: serve.host (127.0.0.1)")
    p.add_argument("--port", type=int, help="default: serve.port (8080)")
    common(p)
    p.set_defaults(func=_cmd_serve_model)
    p = sub.add_parser("predict", help="score every image under a folder into a CSV")
    p.add_argument("--model-uri", required=True, help="as for serve-model")
    p.add_argument("--data", required=True, help="a folder; every image file under it is scored")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"))
    common(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export-triton", help="write a registered model as a Triton repository")
    p.add_argument("--model-uri", required=True, help="e.g. models:/digits@champion")
    p.add_argument("--out", required=True, type=Path, help="the model repository folder")
    p.add_argument("--name", help="model name in the repository (default: the registered name)")
    p.add_argument("--max-batch-size", type=int, default=32)
    common(p)
    p.set_defaults(func=_cmd_export_triton)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Registered first, so it runs last: without it the interpreter spends 2.5 s at exit
    # collecting the objects of torch, timm and GX that the process is about to drop anyway.
    atexit.register(gc.freeze)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in (
        "httpx",
        "httpcore",
        "alembic",
        "mlflow.store",
        "onnx_ir",
        "onnxscript",
        "great_expectations",
        "watchfiles",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except PipelineError as err:
        # The user's to fix (data, layout, config, a model URI): the message is the whole story.
        if args.debug:
            traceback.print_exc()
        print(f"transfer-pipeline: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
