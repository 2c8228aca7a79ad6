"""Benchmark `rvhub search --base` on the local Hub server (tests/hub_server.py) holding 100, 1,000 and 5,000
vectors, 50 of which fit the target: requests and wall time of the search by shape tag (one paged listing,
the matches' cards) against the card-by-card search rvhub did before (list every vector, read every card,
check each against the target).

    python scripts/bench_search.py [--sizes 100,1000,5000] [--matches 50] [--reps 3] [--out results.json]

The vectors are toy ones (rvhub.toy, hidden 64): one real vector of the target's shape, published 50 times;
the others are a llama vector published under five shapes (its own and four others, by shape hash). The
repos are written straight into the server (tests/search_world.py); the server keeps everything in memory
and parses each README once. Each search starts with an empty Hugging Face cache (a cold search, as on a
new machine; ``--reps`` repeats it, each time with a fresh cache) and the target is a local folder, so the
requests counted are the registry's only. Run it on an idle machine: the times are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
CACHE = Path(tempfile.mkdtemp(prefix="rvhub-bench-search-"))
os.environ["HF_HUB_CACHE"] = str(CACHE / "hf")  # before huggingface_hub is imported
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_OFFLINE"] = "0"
os.environ.setdefault("OMP_NUM_THREADS", "1")

TOKEN = "hf_rvhubBENCHtoken0000000000000000"


def _vectors(work: Path) -> tuple[Path, Path, Path]:
    """(target folder, a vector of the target's shape, a llama vector), built once."""
    from rvhub.extract import extract
    from rvhub.toy import build_trio

    qwen = build_trio(work / "qwen", "qwen2", seed=20)
    llama = build_trio(work / "llama", "llama", seed=30)
    for trio, name in ((qwen, "qvec"), (llama, "lvec")):
        extract(str(trio.sft), str(trio.rl), work / name, progress=False)
    return qwen.target, work / "qvec", work / "lvec"


def _fresh_cache() -> None:
    from huggingface_hub import constants

    shutil.rmtree(constants.HF_HUB_CACHE, ignore_errors=True)


def _old_search(reg, target_path: str, n: int) -> int:
    """rvhub's search before the shape tags: list every vector, read each card, check each."""
    from rvhub.card import VectorCard
    from rvhub.compat import open_target
    from rvhub.registry import VectorRef, fit_to_base

    target = open_target(target_path)
    fits = 0
    for repo_id, commit in reg.list_repos(None, n + 10):
        folder, _ = reg.fetch_card(VectorRef(repo_id, commit))
        fits += fit_to_base(VectorCard.read(folder), target).fits
    return fits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,5000")
    ap.add_argument("--matches", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--old-max", type=int, default=5000, help="skip the card-by-card search above this size")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    from hub_server import LocalHub
    from huggingface_hub import constants
    from search_world import Kind, fill, with_shape

    from rvhub._hub_registry import HubRegistry
    from rvhub.card import VectorCard
    from rvhub.registry import search

    constants.HF_HUB_OFFLINE = False
    target, qvec, lvec = _vectors(CACHE / "models")
    qcard, lcard = VectorCard.read(qvec), VectorCard.read(lvec)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        hub = LocalHub.start(TOKEN)
        constants.ENDPOINT = hub.url
        constants.HUGGINGFACE_CO_URL_TEMPLATE = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        others = n - args.matches
        each = others // 5
        kinds = [Kind("fit", qvec, qcard, args.matches), Kind("llama", lvec, lcard, others - 4 * each)]
        kinds += [Kind(f"shape{i}", lvec, with_shape(lcard, f"{i:x}" * 16), each) for i in range(4)]
        t0 = time.perf_counter()
        fill(hub, kinds, org=f"bench{n}")
        filled = time.perf_counter() - t0
        row: dict[str, object] = {"vectors": n, "matches": args.matches, "fill_s": round(filled, 2)}
        runs = {
            "new": lambda n=n: len(search(base=str(target), limit=10 * n).hits),
            "old": lambda n=n, url=hub.url: _old_search(HubRegistry(url), str(target), n),
        }
        for label, run in runs.items():
            if label == "old" and n > args.old_max:
                continue
            times, requests, found = [], [], 0
            for _ in range(args.reps):
                _fresh_cache()
                before = len(hub.log)
                t0 = time.perf_counter()
                found = run()
                times.append(time.perf_counter() - t0)
                requests.append(len(hub.log) - before)
            row[f"{label}_fits"] = found
            row[f"{label}_requests"] = requests[0]
            row[f"{label}_s_median"] = round(statistics.median(times), 3)
            row[f"{label}_s_all"] = [round(t, 3) for t in times]
        hub.close()
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| vectors | matches | new: requests | new: s (median of {args.reps}) | old: requests | old: s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['vectors']:,} | {r['matches']} | {r['new_requests']} | {r['new_s_median']} | "
              f"{r.get('old_requests', '–')} | {r.get('old_s_median', '–')} |")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    shutil.rmtree(CACHE, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
