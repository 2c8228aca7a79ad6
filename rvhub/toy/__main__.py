"""``python -m rvhub.toy build DIR [--seed S] [--recipe default|tiny]`` and ``… evidence DIR [--split S]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rvhub.toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or reuse from the cache) the trained toy family into DIR")
    b.add_argument("dir", type=Path)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--recipe", choices=["default", "tiny"], default="default")
    e = sub.add_parser("evidence", help="accuracy table of a built family (greedy decoding, McNemar p-values)")
    e.add_argument("dir", type=Path)
    e.add_argument("--split", choices=["validation", "test"], default="validation")
    e.add_argument("--scale", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=0, help="the seed the family in DIR was built with")
    e.add_argument("--ranks", default="", help="also target + v's LoRA form at these ranks, e.g. 4,16,64")
    args = parser.parse_args(argv)

    from rvhub.errors import RvhubError
    from rvhub.toy.family import RECIPES, FamilyPaths, build_family

    try:
        if args.command == "build":
            build_family(args.dir, args.seed, RECIPES[args.recipe])
        else:
            from rvhub.toy.evidence import evidence, table

            ranks = tuple(int(r) for r in args.ranks.split(",") if r)
            print(table(evidence(FamilyPaths.at(args.dir, ""), args.split, args.scale, ranks=ranks)))
    except RvhubError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
