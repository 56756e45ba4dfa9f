"""`defectvlm serve`: wire a model URI, the `serve` parameters and alias following into the app."""

from __future__ import annotations

import argparse
import logging

from defectvlm.config import Params, params_from_dict, params_to_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="models:/<name>@<alias> (followed), models:/<name>/<version>, a run or "
        "export folder, or 'base' (default: models:/<registry.model_name>@champion)",
    )
    parser.add_argument("--host", help="address to bind (default: serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: serve.port)")
    parser.add_argument("--no-follow", action="store_true", help="keep the version loaded at start-up")


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("render",), help="render: write the KServe InferenceService YAML")
    parser.add_argument("--model", required=True, help="models:/<name>@<alias> (pinned to its version) or /<version>")
    parser.add_argument("--out", default="deploy", help="output folder (default: deploy)")
    parser.add_argument("--export-uri", help="storage URI of the merged export: also write the vLLM variant")


def deploy_command(args: argparse.Namespace, params: Params) -> int:
    from pathlib import Path

    from defectvlm.serve.deploy import render

    for path in render(params, args.model, Path(args.out), args.export_uri):
        print(path)
    return 0


def build_app(params: Params, uri: str, follow: bool = True):
    """The app for `uri`; a `models:/<name>@<alias>` URI is followed unless `follow` is False."""
    from defectvlm.serve.app import create_app
    from defectvlm.serve.follow import AliasFollower, parse_alias_uri
    from defectvlm.serve.model import load_scorer

    alias = parse_alias_uri(uri) if follow else None
    if alias is None:
        return create_app(params.serve, lambda: load_scorer(uri, params))
    import mlflow

    name, alias_name = alias
    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri, registry_uri=params.tracking.uri)
    follower = AliasFollower(
        client,
        name,
        alias_name,
        lambda version: load_scorer(f"models:/{name}/{version}", params),
        params.serve.follow_interval_s,
    )
    return create_app(params.serve, follower.load_current, follower.follow)


def serve_command(args: argparse.Namespace, params: Params) -> int:
    from defectvlm.serve.app import serve_forever

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    values = params_to_dict(params)
    values["serve"].update(overrides)
    params = params_from_dict(values)  # checked as in the file: --port 0 is refused, naming serve.port
    uri = args.model or f"models:/{params.registry.model_name}@champion"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(params, uri, follow=not args.no_follow)
    serve_forever(app, params.serve.host, params.serve.port)
    return 0
