"""ragkit's NF4 loader with device maps: whole blocks placed as the planner splits them (CPU).

The multi-GPU runs of the same code are in tests/ragkit/test_gpu_llm.py (``--run-gpu``).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from ragkit.errors import MemoryPlanError
from ragkit.planner import format_bytes, plan
from ragkit.quant import load_nf4, nf4_placement
from ragkit.quant.nf4 import set_cpu_packing
from ragkit.quant.placement import attach_hooks

IDS = torch.tensor([[1, 40, 7, 93, 12, 250, 33, 5, 61, 17, 88, 140]])

# Every block of tiny_mistral3_dir, named at several levels and in several spellings.
EVERY_LAYER = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": torch.device("cpu"),
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "cpu",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def _outputs(model) -> tuple[torch.Tensor, list[int]]:
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        new = model.generate(IDS, max_new_tokens=4, do_sample=False)[0, IDS.shape[1]:].tolist()
    return logits, new


def _load(path, device, kernel: str):
    model = load_nf4(path, device=device, progress=False)
    set_cpu_packing(model, kernel == "packed")
    return model


@pytest.fixture(scope="module")
def reference(tiny_mistral3_dir, nf4_cpu_kernel):
    """Logits and greedy tokens of the single-device load."""
    return _outputs(_load(tiny_mistral3_dir, "cpu", nf4_cpu_kernel))


@pytest.fixture(scope="module")
def mapped(tiny_mistral3_dir, nf4_cpu_kernel):
    return _load(tiny_mistral3_dir, EVERY_LAYER, nf4_cpu_kernel)


def test_a_device_map_naming_every_layer_loads_the_same_model(mapped, reference, tiny_mistral3_dir):
    logits, tokens = _outputs(mapped)
    assert torch.equal(logits, reference[0])
    assert tokens == reference[1]
    assert mapped.hf_device_map == dict.fromkeys(EVERY_LAYER, "cpu")
    assert mapped.nf4_placement.bytes_per_device == {"cpu": plan(tiny_mistral3_dir, quant="nf4").weights_bytes}


def test_hooks_that_move_activations_between_blocks_leave_outputs_unchanged(tiny_mistral3_dir, reference,
                                                                             nf4_cpu_kernel):
    """The hooks load_nf4 attaches when blocks sit on several devices, here all on the CPU.

    Attached, as load_nf4 does, before the first forward: attaching reads the state dict, and on the packed
    kernel bitsandbytes turns an already repacked weight back with a re-quantized absmax (not bit-exact).
    """
    mapped = _load(tiny_mistral3_dir, EVERY_LAYER, nf4_cpu_kernel)
    attach_hooks(mapped, mapped.nf4_placement)
    assert hasattr(mapped.model.language_model.layers[1], "_hf_hook")
    logits, tokens = _outputs(mapped)
    assert torch.equal(logits, reference[0])
    assert tokens == reference[1]


def test_bad_device_maps_are_refused_by_name_before_any_weight_is_read(tiny_mistral3_dir, tmp_path):
    shutil.copy(tiny_mistral3_dir / "config.json", tmp_path)  # no weights: the map must be refused first
    partial = {k: v for k, v in EVERY_LAYER.items() if k != "model.language_model.layers.1"}
    missing = r"no device to 1 block\(s\) that hold weights: 'model\.language_model\.layers\.1'\. Add"
    with pytest.raises(MemoryPlanError, match=missing):
        load_nf4(tmp_path, device=partial, progress=False)
    typo = {**partial, "model.language_model.layer.1": "cpu"}
    with pytest.raises(MemoryPlanError, match=r"names 'model\.language_model\.layer\.1', which the model does not"):
        load_nf4(tmp_path, device=typo, progress=False)
    with pytest.raises(MemoryPlanError, match=r"puts weights on GPU 99, but torch sees \d+ CUDA device"):
        load_nf4(tmp_path, device={**EVERY_LAYER, "lm_head": 99, "model.language_model.embed_tokens": 99},
                 progress=False)


def test_tied_weights_on_two_devices_are_refused(tiny_mistral3_dir):
    with pytest.raises(MemoryPlanError, match=r"'lm_head' shares its weight with 'model\.language_model\.embed_tok"):
        nf4_placement(tiny_mistral3_dir, {"": "cpu", "lm_head": 0})


def test_disk_offload_is_refused_by_name(tiny_mistral3_dir):
    with pytest.raises(MemoryPlanError, match=r"'disk' for 'lm_head'.*disk offload is not supported"):
        nf4_placement(tiny_mistral3_dir, {**EVERY_LAYER, "lm_head": "disk"})


def test_auto_places_exactly_the_planners_split(tiny_mistral3_dir):
    """device_map='auto' with the plan's max_memory gives the plan's device_map and per-GPU bytes."""
    weights = plan(tiny_mistral3_dir, quant="nf4").weights_bytes
    p = plan(tiny_mistral3_dir, quant="nf4", gpus=[int(0.7 * weights / 0.88) + 10**6] * 2, context=64)
    placement = nf4_placement(tiny_mistral3_dir, "auto", p.max_memory)
    assert placement.device_map == p.device_map
    assert placement.bytes_per_device == {g.index: g.weights for g in p.gpus}
    assert set(placement.device_map.values()) == {0, 1}
    layers = [k for k in placement.device_map if ".layers." in k and "vision" not in k]
    assert layers == ["model.language_model.layers.0", "model.language_model.layers.1"]  # whole decoder layers


def test_auto_spills_to_the_cpu_what_the_gpu_cannot_hold(tiny_mistral3_dir):
    weights = plan(tiny_mistral3_dir, quant="nf4").weights_bytes
    budget = weights // 2
    placement = nf4_placement(tiny_mistral3_dir, "auto", {0: budget, "cpu": "1GiB"})
    assert set(placement.bytes_per_device) == {0, "cpu"}
    assert placement.bytes_per_device[0] <= budget
    assert sum(placement.bytes_per_device.values()) == weights
    first, *_ = placement.device_map.values()
    assert first == 0  # GPUs are filled first, in module order


def test_auto_on_the_cpu_through_localllm_generates_like_one_device(tiny_mistral3_dir, reference, nf4_cpu_kernel):
    from ragkit import LocalLLM

    llm = LocalLLM(str(tiny_mistral3_dir), quantization="nf4", device_map="auto", max_memory={"cpu": "1GiB"})
    set_cpu_packing(llm.model, nf4_cpu_kernel == "packed")
    assert set(llm.model.hf_device_map.values()) == {"cpu"}
    assert llm.generate_ids(IDS[0].tolist(), max_new_tokens=4) == reference[1]


def test_auto_with_too_little_max_memory_says_what_the_weights_need(tiny_mistral3_dir):
    from ragkit import LocalLLM

    weights = plan(tiny_mistral3_dir, quant="nf4").weights_bytes
    with pytest.raises(MemoryPlanError) as err:
        LocalLLM(str(tiny_mistral3_dir), quantization="nf4", device_map="auto", max_memory={"cpu": "20kB"})
    message = str(err.value)
    assert f"need {format_bytes(weights)} in whole blocks" in message
    assert "max_memory gives {'cpu': 20.0 kB}" in message
    assert str(tiny_mistral3_dir) in message
