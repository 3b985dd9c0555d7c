"""``kiln serve``: the model servers of the pipelines that have been deployed (their deployment files), the
scoped tokens that open them (``kiln serve token add|revoke|list``), and a deployment as Kubernetes manifests
(``kiln serve k8s``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kiln.tasks.cli.help import add_command
from kiln.tasks.settings import get_settings


def add_commands(sub: Any) -> None:
    """Add ``kiln serve start|stop``."""
    serve = add_command(sub, "serve", "start or stop the model servers of the deployed pipelines",
                        "  kiln serve start          # start (or reload) every deployed pipeline's model server\n"
                        "  kiln serve start --json   # the same, printing {pipeline: url}\n"
                        "  kiln serve stop           # stop every model server the pipelines started\n"
                        "  kiln serve token add shop --scope predict --pipeline penguins   # prints the token once\n"
                        "  kiln serve token revoke shop\n"
                        "  kiln serve token list\n"
                        "  kiln serve k8s penguins_species --image registry.example.com/kiln-serve:1.4 > k8s.yaml")
    verbs = serve.add_subparsers(dest="verb", required=True, metavar="VERB")
    start = verbs.add_parser("start", help="start (or reload) the model server of every pipeline with a deployment")
    start.add_argument("--json", action="store_true", help="print {pipeline: url} as JSON")
    start.set_defaults(handler=_start)
    verbs.add_parser("stop", help="stop every model server the pipelines started").set_defaults(handler=_stop)
    _add_token_commands(verbs)
    _add_k8s_command(verbs)


def _add_k8s_command(verbs: Any) -> None:
    """``kiln serve k8s``: what a pipeline serves now, as manifests (README: Kubernetes, on paper)."""
    k8s = verbs.add_parser("k8s", help="print a pipeline's deployment as Kubernetes manifests (not applied or tested "
                           "here): Deployments, a Service, autoscalers, or a KServe InferenceService")
    k8s.add_argument("pipeline", help="a deployed pipeline")
    k8s.add_argument("--image", required=True, help="the serve image (docker/serve.Dockerfile), pushed to a registry")
    k8s.add_argument("--autoscale-on", default="in_flight", choices=["in_flight", "cpu"],
                     help="in-flight requests per pod (needs the Prometheus Adapter) or CPU utilisation")
    k8s.add_argument("--memory-mib", type=int, default=1024, help="memory per pod (default %(default)s)")
    k8s.add_argument("--namespace", default="", help="the objects' namespace (default: kubectl's)")
    k8s.add_argument("--s3-secret", default="", help="a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    k8s.add_argument("--kserve", action="store_true", help="also a KServe InferenceService")
    k8s.set_defaults(handler=_k8s)


def _add_token_commands(verbs: Any) -> None:
    from kiln.tasks.serving.tokens import SCOPES

    token = verbs.add_parser("token", help="scoped tokens of the model servers (running servers pick up a change "
                             "within a second: rotate by adding the new token, moving clients, revoking the old)")
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a token and print it (once: the tokens file keeps only its SHA-256)")
    add.add_argument("name", help="a unique name, shown in refusals and in 'token list' (never the token)")
    add.add_argument("--scope", action="append", choices=SCOPES, required=True,
                     help="predict (POST /predict) or admin (POST /admin/reload, GET /admin/stats); repeatable")
    add.add_argument("--pipeline", action="append", required=True,
                     help="a pipeline whose server the token opens, or '*' for every pipeline; repeatable")
    add.set_defaults(handler=_token_add)
    revoke = actions.add_parser("revoke", help="remove a token by name (servers refuse it within a second)")
    revoke.add_argument("name")
    revoke.set_defaults(handler=_token_revoke)
    actions.add_parser("list", help="the tokens by name, scopes and pipelines").set_defaults(handler=_token_list)


def _tokens_file() -> Any:
    from kiln.tasks.serving.tokens import TOKENS_FILE

    return get_settings().serving_dir / TOKENS_FILE


def _token_add(args: argparse.Namespace) -> int:
    from kiln.tasks.serving.tokens import TokenFileError, add_token

    try:
        print(add_token(_tokens_file(), args.name, args.scope, args.pipeline))
    except TokenFileError as exc:
        print(f"kiln serve token add: {exc}", file=sys.stderr)
        return 2
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from kiln.tasks.serving.tokens import revoke_token

    if not revoke_token(_tokens_file(), args.name):
        print(f"no token named {args.name!r} in {_tokens_file()}")
        return 1
    print(f"revoked {args.name!r}")
    return 0


def _token_list(args: argparse.Namespace) -> int:
    from kiln.tasks.serving.tokens import read_tokens

    grants = sorted(read_tokens(_tokens_file()).values(), key=lambda g: g.name)
    print("\n".join(f"{g.name}: scopes {', '.join(sorted(g.scopes))}; pipelines {', '.join(sorted(g.pipelines))}"
                    for g in grants) or f"no scoped tokens in {_tokens_file()} (the kiln token opens everything)")
    return 0


def _start(args: argparse.Namespace) -> int:
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.spec import load_specs

    urls = {}
    for _path, spec in load_specs(get_settings().pipelines_dir)[0]:
        endpoint = Endpoint.of(spec)
        if (deployment := endpoint.current()) is not None:
            urls[spec.name] = endpoint.serve(deployment).url
    if args.json:
        print(json.dumps(urls, indent=2))
    else:
        print("\n".join(f"{name}: {url}" for name, url in urls.items()) or "no pipeline has been deployed")
    return 0


def _k8s(args: argparse.Namespace) -> int:
    """The manifests of what ``args.pipeline`` serves, its bundles named where the registry keeps them."""
    from dataclasses import replace

    from kiln.tasks.fleet.kubernetes import render_manifests_yaml
    from kiln.tasks.fleet.kubernetes_config import KubernetesConfig, ManifestError
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.serving.deployment import ModelRef
    from kiln.tasks.spec import load_specs
    from kiln.tasks.tracking.registry import Registry

    specs = {spec.name: spec for _path, spec in load_specs(get_settings().pipelines_dir)[0]}
    if args.pipeline not in specs:
        print(f"kiln serve k8s: no pipeline {args.pipeline!r} (pipelines: {', '.join(sorted(specs))})",
              file=sys.stderr)
        return 2
    deployment = Endpoint.of(specs[args.pipeline]).current()
    if deployment is None:
        print(f"kiln serve k8s: {args.pipeline} has not been deployed here; run its pipeline first", file=sys.stderr)
        return 2
    registry = Registry.from_settings()

    def stored(version: str) -> str:
        return registry.bundle_uri(registry.version(args.pipeline, version))

    deployment = replace(deployment, champion=ModelRef(deployment.champion.version,
                                                       stored(deployment.champion.version)))
    if deployment.canary is not None:
        deployment = replace(deployment, canary=replace(deployment.canary, bundle=stored(deployment.canary.version)))
    try:
        config = KubernetesConfig(pipeline=args.pipeline, image=args.image, deployment=deployment,
                                  autoscale_on=args.autoscale_on, memory_mib=args.memory_mib,
                                  namespace=args.namespace, s3_secret=args.s3_secret, kserve=args.kserve)
    except ManifestError as exc:
        print(f"kiln serve k8s: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render_manifests_yaml(config))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from kiln.tasks.serving.process import stop_servers

    print(f"stopped: {', '.join(stop_servers(get_settings().serving_dir)) or 'none running'}")
    return 0
