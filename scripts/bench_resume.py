"""Bytes a server sends for one file download cut once, huggingface_hub's downloader against rvhub's.

Runs the local Hub server of the tests (tests/hub_server.py) on 127.0.0.1; random files; the connection is cut
once at a fraction of the file. Counts bytes, not time, so a busy machine does not change the numbers.

    python scripts/bench_resume.py [--sizes-mib 8 24] [--cuts 0.3 0.5 0.9]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # the local server has no xet
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="rvhub-bench-resume-")
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

TOKEN = "bench-token"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[8, 24])
    parser.add_argument("--cuts", type=float, nargs="+", default=[0.3, 0.5, 0.9])
    args = parser.parse_args()

    import logging

    from hub_server import LocalHub
    from huggingface_hub import HfApi, constants, hf_hub_download

    from rvhub import _transfer

    logging.disable(logging.WARNING)  # both downloaders warn about the cut
    hub = LocalHub.start(TOKEN)
    constants.ENDPOINT = hub.url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    api = HfApi(endpoint=hub.url, token=TOKEN)
    print(f"{'file':>8} {'cut at':>7} {'huggingface_hub':>22} {'rvhub':>22}")
    for mib in args.sizes_mib:
        data = os.urandom(mib << 20)
        sha = hashlib.sha256(data).hexdigest()
        for cut in args.cuts:
            repo = f"bench/f{mib}-{int(cut * 100)}"
            api.create_repo(repo)
            commit = api.upload_file(path_or_fileobj=data, path_in_repo="x.safetensors", repo_id=repo).oid
            sent = []
            for run in ("hf", "rvhub"):
                hub.sent.clear()
                hub.cut_downloads("x.safetensors", int(cut * len(data)))
                if run == "hf":
                    path = hf_hub_download(repo, "x.safetensors", revision=commit, endpoint=hub.url, token=TOKEN)
                    Path(path).unlink()  # the next run downloads again
                    for blob in (Path(path).parent.parent.parent / "blobs").iterdir():
                        blob.unlink()
                else:
                    _transfer.download(repo, "x.safetensors", commit, size=len(data), sha256=sha, endpoint=hub.url,
                                       token=TOKEN, progress=False)
                sent.append(hub.sent["x.safetensors"])
            cells = [f"{s:>12,} ({s / len(data):.2f}x)" for s in sent]
            print(f"{mib:>5} MiB {cut:>7.0%} {cells[0]:>22} {cells[1]:>22}")
    hub.close()


if __name__ == "__main__":
    main()
