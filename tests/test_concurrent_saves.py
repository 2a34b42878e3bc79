"""Two processes saving adapters into one folder never leave a mixed pair.

Writer A saves adapters whose every ``lora_b`` is 1.0 with ``alpha`` 1; writer B, 2.0
with ``alpha`` 2. Both save into the same folder many times, at once, while this
process loads from it. Without the folder lock their renames interleave and about half
of the rounds leave A's weights beside B's config. With it, every load sees one
writer's pair: the weights' value equals the config's alpha. A pair mixed by other
means (a crash between two renames, a file copied in) is refused by its save id.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import AdapterError, Model, ModelArgs, apply_lora, load_adapters

import mlx.core as mx

ROUNDS = 30

WRITER = """
import sys
import lora_course
import mlx.core as mx
from lora_course import Model, ModelArgs, apply_lora, save_adapters
from lora_course.tree import tree_flatten, tree_unflatten
value, folder = float(sys.argv[1]), sys.argv[2]
model = apply_lora(Model(ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2,
                                   vocab_size=64)), num_layers=2, rank=2, alpha=value)
ones = [(k, mx.full(v.shape, value)) for k, v in tree_flatten(model.trainable_parameters())]
model.update(tree_unflatten(ones))
print("ready", flush=True)
sys.stdin.readline()  # start together
for _ in range(int(sys.argv[3])):
    save_adapters(model, folder)
"""


def fresh():
    return Model(ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=64))


def consistent(folder) -> bool:
    model = load_adapters(fresh(), folder)
    b = model.layers[0].self_attn.q_proj.lora_b
    return mx.all(b == model.lora_config.alpha).item()


def test_two_writers_never_leave_a_mixed_pair(tmp_path):
    folder = tmp_path / "adapters"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(v), str(folder), str(ROUNDS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for v in (1.0, 2.0)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    loads = 0
    while any(p.poll() is None for p in procs):
        if (folder / "adapter_config.json").exists():
            assert consistent(folder), "a load saw one writer's weights with the other's config"
            loads += 1
        time.sleep(0.005)
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert consistent(folder)
    assert loads > 0


def test_a_pair_mixed_by_hand_is_refused(tmp_path):
    for value, name in ((1.0, "a"), (2.0, "b")):
        model = apply_lora(fresh(), num_layers=2, rank=2, alpha=value)
        lora_course.save_adapters(model, tmp_path / name)
    (tmp_path / "a" / "adapters.safetensors").replace(tmp_path / "b" / "adapters.safetensors")
    try:
        load_adapters(fresh(), tmp_path / "b")
    except AdapterError as e:
        assert "another save" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("a mixed pair was accepted")
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["lora_course_save_id"]
