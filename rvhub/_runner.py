"""The runs of ``rvhub eval``: one model load, in-place deltas, one ``simple_evaluate`` per run and task."""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._io import check_stop, dtype_code, write_text
from .inmemory import Control, check_loaded, plan_model, vector_added

if TYPE_CHECKING:
    from .eval import Run, TaskResult
    from .formats import AdapterFolder, VectorFolder
    from .sources import ModelSource

logger = logging.getLogger(__name__)
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


class Runner:
    """Holds the loaded target and lm-eval's model wrapper for every run."""

    def __init__(
        self, lm_eval: Any, vec: VectorFolder | AdapterFolder, tgt: ModelSource, device: torch.device,
        dtype: str | None, task_manager: Any, control: str, control_seed: int, allow_vocab_mismatch: bool,
        options: dict[str, Any], output_dir: Path | None,
    ):
        self.lm_eval = lm_eval
        self.vec = vec
        self.tgt = tgt
        self.device = device
        self.task_manager = task_manager
        self.options = options
        self.output_dir = output_dir
        self.allow_vocab_mismatch = allow_vocab_mismatch
        self.control = Control(vec, control, control_seed) if control != "none" else None  # type: ignore[arg-type]
        self.harness_version = _harness_version(lm_eval)
        if dtype is None:  # the target's own: the dtype most of its float tensors have
            codes = [i.dtype for i in tgt.tensors.values() if i.is_float]
            code = max(sorted(set(codes)), key=codes.count) if codes else "F32"
        else:
            code = dtype_code(dtype)
        self.dtype_name = _DTYPES[code]
        self.model, self.lm = self._load(getattr(torch, self.dtype_name))

    def _load(self, dtype: torch.dtype) -> tuple[Any, Any]:
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(self.tgt.root), dtype=dtype, trust_remote_code=False)
        model = model.to(self.device)  # type: ignore[arg-type]
        model.eval()
        tok = AutoTokenizer.from_pretrained(str(self.tgt.root), trust_remote_code=False)
        plan, _ = plan_model(model, self.vec, self.allow_vocab_mismatch)
        # restoring re-reads these tensors from the target's files: exact only if the load changed nothing
        check_loaded(model, self.tgt, sorted(plan))
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=self.options["batch_size"])
        return model, lm

    def run_all(self, runs: list[Run], tasks: list[str], progress: bool) -> dict[Run, dict[str, TaskResult]]:
        from huggingface_hub.utils.tqdm import tqdm

        out: dict[Run, dict[str, TaskResult]] = {}
        with tqdm(total=len(runs) * len(tasks), desc="eval", unit="run×task", disable=not progress,  # type: ignore[no-untyped-call]
                  leave=False, dynamic_ncols=True) as bar:
            for run in runs:
                deltas = {"target": None, "plus": self.vec, "minus": self.vec, "sweep": self.vec,
                          "control": self.control}[run.role]
                ctx = (vector_added(self.model, deltas, run.scale, restore=self.tgt,
                                    allow_vocab_mismatch=self.allow_vocab_mismatch)
                       if deltas is not None else nullcontext())
                with ctx:
                    out[run] = {}
                    for task in tasks:
                        bar.set_postfix_str(f"{run.label}: {task}", refresh=False)
                        check_stop()
                        out[run][task] = self._evaluate(run, task)
                        bar.update(1)
        return out

    def _evaluate(self, run: Run, task: str) -> TaskResult:
        from .eval import TaskResult

        o = self.options
        seed = o["seed"]
        raw = self.lm_eval.simple_evaluate(
            model=self.lm, tasks=[task], num_fewshot=o["num_fewshot"], limit=o["limit"],
            task_manager=self.task_manager, apply_chat_template=o["apply_chat_template"], gen_kwargs=o["gen_kwargs"],
            log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, verbosity="WARNING",
        )
        if raw is None:  # only on non-zero ranks of a distributed run
            raise RuntimeError("lm_eval.simple_evaluate returned nothing")
        res = raw["results"].get(task, {})
        scores: dict[str, float] = {}
        stderr: dict[str, float | None] = {}
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            scores[key] = float(value)
            err = res.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            stderr[key] = float(err) if isinstance(err, int | float) and math.isfinite(err) else None
        per_sample: dict[str, dict[int, float]] = {k: {} for k in scores}
        samples = (raw.get("samples") or {}).get(task, [])
        for s in samples:
            for key in scores:
                metric, _, filt = key.partition(",")
                if s.get("filter", "none") == (filt or "none") and isinstance(s.get(metric), int | float):
                    per_sample[key][int(s["doc_id"])] = float(s[metric])
        counts = (raw.get("n-samples") or {}).get(task) or {}
        n = counts.get("effective", counts.get("original"))
        version = (raw.get("versions") or {}).get(task)
        fewshot = (raw.get("n-shot") or {}).get(task)
        cfg_shot = ((raw.get("configs") or {}).get(task) or {}).get("num_fewshot")
        if self.output_dir is not None:
            self._log(run, task, raw, samples)
        return TaskResult(
            scores=scores, stderr=stderr, n=int(n) if isinstance(n, int) else None, per_sample=per_sample,
            version=str(version) if version is not None else None,
            task_hash=_task_hash(samples),
            num_fewshot=fewshot if isinstance(fewshot, int) else cfg_shot if isinstance(cfg_shot, int) else None,
            higher_is_better={k: bool(v) for k, v in ((raw.get("higher_is_better") or {}).get(task) or {}).items()},
        )

    def _log(self, run: Run, task: str, raw: dict[str, Any], samples: list[Any]) -> None:
        """The harness's results and per-sample records of one run and task, under --output-dir."""
        assert self.output_dir is not None
        name = run.role if run.role == "target" else f"{run.role}_{run.scale:+g}"
        folder = self.output_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in raw.items() if k != "samples"}
        write_text(folder / f"results_{task}.json", json.dumps(summary, indent=2, default=str) + "\n")
        write_text(folder / f"samples_{task}.jsonl", "".join(json.dumps(s, default=str) + "\n" for s in samples))


def _harness_version(lm_eval: Any) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return getattr(lm_eval, "__version__", None)


def _task_hash(samples: list[Any]) -> str | None:
    """The hash lm-eval's EvaluationTracker records as task_hashes: of every sample's doc, prompt and target
    hashes, in order."""
    from lm_eval.utils import hash_string

    try:
        return str(hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples)))
    except (KeyError, TypeError):
        return None


