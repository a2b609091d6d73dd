"""`fisherguard serve`: run the HTTP service (docs/api.md); every flag is also FISHERGUARD_<NAME>."""

import argparse


def add(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    s = sub.add_parser("serve", help="run the HTTP service")
    s.add_argument("--model", action="append", help="bundle name (mnist, cifar10) or directory; repeat to serve several; default mnist")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--max-batch-size", type=int)
    s.add_argument("--max-delay-ms", type=float)
    s.add_argument("--max-queue-images", type=int)
    s.add_argument("--request-timeout-ms", type=float)
    s.add_argument("--torch-threads", type=int)
    s.add_argument("--allocator", choices=["auto", "jemalloc", "system"])
    s.add_argument("--log-level")
    s.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from service.serve import allocator
    from service.serve.settings import Settings

    fields = set(Settings.model_fields)
    given = {k: v for k, v in vars(a).items() if k in fields and v is not None}
    if "model" in given:
        given["model"] = ",".join(given["model"])  # --model a --model b: the setting's comma list
    settings = Settings(**given)
    allocator.ensure(settings.allocator)  # before torch is imported: may re-execute this command
    from service.serve.server import run as serve

    serve(settings)
    return 0
