"""The runs of ``rvhub eval``: one model load, in-place deltas, one ``simple_evaluate`` per run and task."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._io import check_stop, dtype_code, write_text
from .inmemory import Control, check_loaded, plan_model, switch_to, widen_from_files

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
        self._tasks: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        codes = [i.dtype for i in tgt.tensors.values() if i.is_float]
        self.files_code = max(sorted(set(codes)), key=codes.count) if codes else "F32"  # most float tensors'
        code = self.files_code if dtype is None else dtype_code(dtype)  # default: the target's own
        self.dtype_name = _DTYPES[code]
        self.model, self.lm = self._load(getattr(torch, self.dtype_name))

    def _load(self, dtype: torch.dtype) -> tuple[Any, Any]:
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer

        root = str(self.tgt.root)
        files = getattr(torch, _DTYPES[self.files_code])
        model = None
        widened: set[str] = set()
        if files.itemsize < dtype.itemsize:
            # wider than the files (float32 from bf16): loaded as stored (mapped, unread), then widened from
            # the files tensor by tensor, which spares the peak of widening a mapped checkpoint (widen_from_files)
            model = AutoModelForCausalLM.from_pretrained(root, dtype=files, trust_remote_code=False)
            done = widen_from_files(model, self.tgt, dtype)
            if done is None:
                model = None
            else:
                widened = done
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, trust_remote_code=False)
        model = model.to(self.device)  # type: ignore[arg-type]
        model.eval()
        tok = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
        plan, _ = plan_model(model, self.vec, self.allow_vocab_mismatch)
        # restoring re-reads these tensors from the target's files: exact only if the load changed nothing (a
        # widened tensor was just read from them)
        check_loaded(model, self.tgt, sorted(set(plan) - widened))
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=self.options["batch_size"])
        return model, lm

    def run_all(self, runs: list[Run], tasks: list[str], progress: bool) -> dict[Run, dict[str, TaskResult]]:
        """Every run on every task. The weights go from one run's straight to the next's (:func:`switch_to`,
        from the target's files); after the last run the model is left as it is (this runner is done with it)."""
        from huggingface_hub.utils.tqdm import tqdm

        out: dict[Run, dict[str, TaskResult]] = {}
        touched: list[str] = []
        with tqdm(total=len(runs) * len(tasks), desc="eval", unit="run×task", disable=not progress,  # type: ignore[no-untyped-call]
                  leave=False, dynamic_ncols=True) as bar:
            for run in runs:
                deltas = {"target": None, "plus": self.vec, "minus": self.vec, "sweep": self.vec,
                          "control": self.control}[run.role]
                check_stop()
                # a control's tensors on one thread: its norm pass holds float64 copies of a noise block and of
                # a block of v, and two threads of them would break the memory budget (one model copy + 1 GB)
                touched = switch_to(self.model, self.tgt, deltas, run.scale, touched,
                                    allow_vocab_mismatch=self.allow_vocab_mismatch,
                                    threads=1 if run.role == "control" else None)
                out[run] = {}
                for task in tasks:
                    bar.set_postfix_str(f"{run.label}: {task}", refresh=False)
                    check_stop()
                    out[run][task] = self._evaluate(run, task)
                    bar.update(1)
        return out

    def _task(self, task: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """lm-eval's loaded task dict for ``task`` with the settings ``simple_evaluate`` would give it, built
        once, and the random states its building left (each run starts from them, as a fresh
        ``simple_evaluate`` would: seeded, then the task built)."""
        if task in self._tasks:
            return self._tasks[task]
        from lm_eval.utils import simple_parse_args_string

        o = self.options
        _seed_all(o["seed"])
        loaded = self.task_manager.load([task])
        gen = o["gen_kwargs"]
        gen = (simple_parse_args_string(gen) or None) if isinstance(gen, str) else gen
        for t in loaded["tasks"].values():
            if t.get_config("output_type") == "generate_until" and gen is not None:
                t.set_config(key="generation_kwargs", value=gen, update=True)
            if o["num_fewshot"] is not None:
                if t.get_config("num_fewshot") != 0:  # a task that sets 0 keeps it, as in simple_evaluate
                    t.set_config(key="num_fewshot", value=o["num_fewshot"])
            elif t.get_config("num_fewshot") is None:
                t.set_config(key="num_fewshot", value=0)
        self._tasks[task] = (loaded, _random_states())
        return self._tasks[task]

    def _evaluate(self, run: Run, task: str) -> TaskResult:
        from lm_eval.evaluator import evaluate

        from .eval import TaskResult

        o = self.options
        loaded, states = self._task(task)
        _set_random_states(states)
        for t in loaded["tasks"].values():
            t.set_fewshot_seed(seed=o["seed"])
        # what simple_evaluate runs after building the task, without its environment report (a pip list and a
        # git call per run) that nothing here reads
        raw = evaluate(
            lm=self.lm, task_dict=loaded, limit=o["limit"], log_samples=True,
            apply_chat_template=o["apply_chat_template"], fewshot_as_multiturn=True,
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


def _seed_all(seed: int) -> None:
    """The seeds ``simple_evaluate(random_seed=…, numpy_random_seed=…, torch_random_seed=…)`` sets."""
    import random

    import numpy as np
    from lm_eval.utils import set_torch_seed

    random.seed(seed)
    np.random.seed(seed)
    set_torch_seed(seed)


def _random_states() -> dict[str, Any]:
    import random

    import numpy as np

    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_random_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


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


