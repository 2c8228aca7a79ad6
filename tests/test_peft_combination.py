"""Why `rvhub combine` refuses adapters and combines the vectors they came from: PEFT's
``add_weighted_adapter(..., [1, -1], combination_type="linear")`` sums the A factors and the B factors
separately, so the product it merges is (B1 + B2)(A1 - A2), not B1 A1 - B2 A2: it carries the cross terms
B2 A1 - B1 A2. rvhub's difference of the two vectors is exact."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_algebra import decoded, delta

from rvhub.algebra import combine
from rvhub.compress import compress
from rvhub.extract import extract
from rvhub.toy import plant_lowrank_delta

MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def two(lowrank, tmp_path_factory):
    t, v1 = lowrank("llama")
    root = tmp_path_factory.mktemp("peft-combination")
    rl2 = plant_lowrank_delta(t.sft, root / "rl2", rank=3, seed=123)
    v2 = root / "v2"
    extract(str(t.sft), str(rl2), v2, progress=False)
    a1, a2 = root / "a1", root / "a2"
    compress(v1, a1, rank=3, progress=False)
    compress(v2, a2, rank=3, progress=False)
    return t, rl2, v1, v2, a1, a2


def _factors(adapter):
    w = load_file(str(adapter / "adapter_model.safetensors"))
    a = next(v for k, v in w.items() if MODULE in k and "lora_A" in k)
    b = next(v for k, v in w.items() if MODULE in k and "lora_B" in k)
    return a, b


def test_peft_linear_difference_has_cross_terms_and_rvhub_difference_is_exact(two, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t, rl2, v1, v2, a1, a2 = two
    name = MODULE + ".weight"
    want = delta(t.rl, t.sft)[name] - delta(rl2, t.sft)[name]

    model = AutoModelForCausalLM.from_pretrained(str(t.sft), torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(a1), adapter_name="one")
    peft_model.load_adapter(str(a2), adapter_name="two")
    peft_model.add_weighted_adapter(["one", "two"], [1.0, -1.0], "diff", combination_type="linear")
    layer = peft_model.get_submodule("base_model.model." + MODULE)
    peft_diff = layer.get_delta_weight("diff").detach()

    (a_1, b_1), (a_2, b_2) = _factors(a1), _factors(a2)
    s = layer.scaling["one"]
    assert layer.scaling["two"] == s
    cross = s * (b_1 + b_2) @ (a_1 - a_2)  # what PEFT's linear combination merges (known answer)
    torch.testing.assert_close(peft_diff, cross, rtol=1e-5, atol=1e-7)
    err = (peft_diff - want).norm() / want.norm()
    assert err > 0.5  # the cross terms are as large as the difference itself

    combine([v1, v2], tmp_path / "diff", weights=[1.0, -1.0], progress=False)
    got = decoded(tmp_path / "diff")[name]
    assert torch.equal(got.reshape(want.shape) + 0.0, want + 0.0)  # bit for bit: fl32(rl − sft) − fl32(rl2 − sft)
