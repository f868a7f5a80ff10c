"""Benchmark: placeholder until the bench command lands."""


def add_parser(sub):
    sub.add_parser("bench", help="latency of the fused and unfused paths (not yet built)")


def run(args):
    raise SystemExit("bench: not built yet")
